"""Error bounds of the posterior diagnostics (entropy, effective sample size) beside the result.

``OracleResult.entropy_error_bound`` and ``ess_error_bound`` are (B,) upper bounds on the absolute error of each query's entropy (nats)
and ESS against the exact values over the stored data, in both precisions. In the fast mode the
diagnostics come from the screening logits (error up to the screening bound ``e``, often tenths
of a nat near t = 1), so they can be far off, and these bounds say how far: ``|H' - H| <= (e^2e -
1) H + 2e`` and ``ESS`` within a factor ``e^4e`` (the proofs are in :mod:`._bounds`,
:func:`~._bounds.entropy_error` and :func:`~._bounds.ess_error`). In the exact mode they are of the
order of the float64 rounding.
"""

from __future__ import annotations

import torch

from floworacle_server.engine._bounds import entropy_error, ess_error

__all__ = ["diagnostic_bounds"]


def diagnostic_bounds(
    entropy: torch.Tensor | None,
    ess: torch.Tensor | None,
    logit_err: torch.Tensor,
    tail: torch.Tensor,
    rows: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(entropy bound, ESS bound), each (S,) per slot or None where the diagnostic is not computed.

    Args:
        entropy, ess: (S,) the slots' computed diagnostics, or None.
        logit_err: (S,) bound on the error of every logit that carries weight.
        tail: (S,) bound on the weight left out relative to the kept mass (0 in the fast mode).
        rows: the most samples a slot's posterior runs over (the data set's N).
    """
    ent = None if entropy is None else entropy_error(entropy, logit_err, tail, rows)
    es = None if ess is None else ess_error(ess, logit_err, tail, rows)
    return ent, es
