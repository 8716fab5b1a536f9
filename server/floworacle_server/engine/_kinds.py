"""The engine's one entry point, :func:`oracle`, for every oracle *kind* and precision, and the
outputs that follow from a posterior mean.

Kinds: ``"global"`` (the exact oracle over the whole data set, :func:`._assemble.global_oracle`;
with precision "knn" its sublinear estimate, :mod:`._knn_target`),
``"local"`` (:mod:`._local`), ``"equivariant"`` (:mod:`._equivariant`) and ``"linear"``
(:mod:`._linear`). Each of the last three gives x1_hat and a proven bound on its error; the
outputs follow as for the global oracle (oracle-math.md):

    u = A x1_hat + B x_t,  A = d_alpha - alpha d_sigma / sigma,  B = d_sigma / sigma
    eps_hat = (x_t - alpha x1_hat) / sigma,   score = (alpha x1_hat - x_t) / sigma^2

with the velocity's bound ``|A| e_x1 + 4 u (|A| max|x1| + |B| ||x_t||)`` (:func:`outputs_from_x1`).
Guided queries (CFG) combine the unconditional and the conditional x1_hat of the same kind,
``x1_w = x1(x) + w (x1(x | y) - x1(x))`` inside the guidance interval, which is linear like the
velocity. The posterior diagnostics (top-k, entropy, ESS, variance) belong to the global
posterior over samples and are refused for the other kinds.

The patch size of the patch kinds is one odd P, one per query, or a schedule over t
(:func:`patch_schedule`: the ELS paper calibrates a P per t, small late in the path).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from floworacle.protocol import KINDS as KIND_ENUMS
from floworacle.protocol import PATCH_KINDS, OracleQuery, patch_schedule
from floworacle_server.data import Dataset
from floworacle_server.engine._assemble import SlotMerge, global_oracle
from floworacle_server.engine._bounds import U64
from floworacle_server.engine._config import EngineConfig
from floworacle_server.engine._equivariant import equivariant_oracle
from floworacle_server.engine._knn_target import knn_answer
from floworacle_server.engine._linear import linear_oracle
from floworacle_server.engine._local import local_oracle
from floworacle_server.engine._patches import PatchConfig, PatchResult
from floworacle_server.engine._types import OracleResult, as_host, as_tensor, check_sample_outputs, outputs_from_x1

__all__ = ["KINDS", "PATCH_KINDS", "oracle", "kind_oracle", "kind_x1", "patch_schedule"]

#: The oracle kinds' names, the exact global one first (the protocol's table).
KINDS: tuple[str, ...] = tuple(KIND_ENUMS)


def kind_x1(
    ds: Dataset,
    kind: str,
    x: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    *,
    patch_size: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
    exclude: torch.Tensor | np.ndarray | None = None,
    rank: int | None = None,
    config: PatchConfig | None = None,
) -> PatchResult:
    """x1_hat and its bound under ``kind`` ("local", "equivariant" or "linear"); see the kinds'
    modules for the arguments.

    Raises:
        ValueError: an unknown kind, a patch kind without ``patch_size``, or the kind's own refusals.
    """
    if kind in PATCH_KINDS:
        if patch_size is None:
            raise ValueError(f"kind {kind!r} needs a patch size: an odd P, one per query, or a schedule over t")
        if rank is not None:
            raise ValueError(f"rank belongs to kind 'linear', not {kind!r}")
        fn = local_oracle if kind == "local" else equivariant_oracle
        return fn(ds, x, alpha, sigma, patch_size, labels=labels, exclude=exclude, config=config)
    if kind == "linear":
        if patch_size is not None:
            raise ValueError("kind 'linear' takes no patch size (it is not a patch oracle); drop patch_size")
        return linear_oracle(ds, x, alpha, sigma, labels=labels, exclude=exclude, rank=rank)
    raise ValueError(f"unknown oracle kind {kind!r}; use one of {', '.join(KINDS)}")


def kind_oracle(
    ds: Dataset,
    query: OracleQuery,
    kind: str = "global",
    *,
    patch_size: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    rank: int | None = None,
    config: PatchConfig | None = None,
) -> OracleResult:
    """The oracle of ``kind`` for a batch of queries: what :func:`._assemble.oracle` answers for
    "global", the same outputs from the kind's x1_hat for the others.

    ``query.labels`` (class-conditional, -1 unconditional), ``query.guidance`` (CFG inside
    ``[t_lo, t_hi]``), ``query.exclude`` (leave-one-out; not for "linear") and ``query.coeffs``
    carry over; ``query.precision`` is ignored (every kind answers in float64 with its bound).
    ``patch_size``: the patch kinds' P (one, or (B,) per query: see :func:`patch_schedule`).
    ``rank``: the linear kind's number of eigenpairs (None: all).

    Raises:
        ValueError: an unknown kind, a combination the kind cannot answer (diagnostics, a patch
            oracle on data without an image shape or with a bad P, leave-one-out for "linear"),
            or the kind's own refusals; each message says how to fix it.
    """
    if kind == "global":
        if patch_size is not None or rank is not None:
            raise ValueError("kind 'global' takes neither patch_size nor rank")
        return global_oracle(ds, query)
    if kind not in KINDS:
        raise ValueError(f"unknown oracle kind {kind!r}; use one of {', '.join(KINDS)}")
    check_sample_outputs(query.outputs, f"kind {kind!r}")
    x_t = as_tensor(query.x_t, ds.device)
    b = int(x_t.shape[0])
    x = x_t.reshape(b, -1)
    exclude = None if query.exclude is None else as_tensor(query.exclude, ds.device, torch.int64)
    c = query.coeffs
    alpha = torch.from_numpy(np.asarray(c.alpha, dtype=np.float64)).to(ds.device)
    sigma = torch.from_numpy(np.asarray(c.sigma, dtype=np.float64)).to(ds.device)
    sizes = patch_size
    if isinstance(patch_size, (np.ndarray, torch.Tensor, list, tuple)) and kind in PATCH_KINDS:
        sizes = np.asarray(patch_size.cpu() if isinstance(patch_size, torch.Tensor) else patch_size, dtype=np.int64)
    labels = None if query.labels is None else as_host(query.labels).astype(np.int64).reshape(b)
    common = {"patch_size": sizes, "exclude": exclude, "rank": rank, "config": config}
    g = query.guidance
    guided = np.zeros(b, dtype=bool)
    if g is not None and g.scale != 1.0 and labels is not None:
        if query.t is None:
            raise ValueError("a guidance interval needs the queries' t")
        t = as_host(query.t).reshape(b)
        guided = (labels >= 0) & (t >= g.t_lo) & (t <= g.t_hi)
    res = kind_x1(ds, kind, x, alpha, sigma, labels=labels, **common)  # type: ignore[arg-type]
    x1, err = res.x1_hat, res.x1_hat_error_bound
    xmax: torch.Tensor | None = None
    if guided.any():
        assert g is not None and labels is not None
        gq = np.flatnonzero(guided)
        sub = common.copy()
        if isinstance(sizes, np.ndarray) and sizes.ndim == 1:
            sub["patch_size"] = sizes[gq]
        if exclude is not None:
            sub["exclude"] = exclude[torch.from_numpy(gq).to(exclude.device)]
        gt = torch.from_numpy(gq).to(ds.device)
        un = kind_x1(ds, kind, x.index_select(0, gt), alpha.index_select(0, gt), sigma.index_select(0, gt), **sub)  # type: ignore[arg-type]
        w = float(g.scale)
        x1 = x1.clone()
        cond = x1.index_select(0, gt)
        x1.index_copy_(0, gt, torch.lerp(un.x1_hat, cond, w))
        err = err.clone()
        # the two bounds, weighted, and the rounding of the lerp (three operations)
        big = torch.maximum(un.x1_hat.abs().amax(dim=1), cond.abs().amax(dim=1))
        mixed = abs(1 - w) * un.x1_hat_error_bound + abs(w) * err.index_select(0, gt)
        err.index_copy_(0, gt, mixed + 3 * U64 * (1 + 2 * abs(w)) * big)
        xmax = x1.abs().amax(dim=1) * (1 + 4 * U64)
    out = outputs_from_x1(x, x1, err, c, query.outputs, x1_max=xmax)
    out.refined = res.refined
    return out


def oracle(
    ds: Dataset,
    query: OracleQuery,
    *,
    chunk_rows: int | None = None,
    screen: str = "float32",
    config: EngineConfig | None = None,
    merge: SlotMerge | None = None,
) -> OracleResult:
    """The oracle for a batch of queries, whatever their kind and precision: the engine's entry.

    Kind "global", precision "exact" / "fast": :func:`._assemble.global_oracle` (``chunk_rows``,
    ``screen``, ``config`` and ``merge``, a gang's hook, are its); precision "knn": the sublinear
    estimate (:func:`._knn_target.knn_answer`, through the data set's faiss index). Kinds
    "local", "equivariant", "linear": :func:`kind_oracle` with the query's patch sizes. The last
    two are one process's only.
    Returns float64 tensors on the data's device.

    Raises:
        ValueError: what the kind refuses (each message says how to fix it).
    """
    if query.precision == "knn":
        if merge is not None:
            raise ValueError("precision 'knn' searches one process's faiss index; a gang's shards hold none")
        return knn_answer(ds, query)
    if query.kind != "global":
        if merge is not None:
            raise ValueError(
                f"kind {query.kind!r} is not merged over a gang's shards yet; ask a single-process server for it"
            )
        sizes = None if query.patch_size is None else as_host(query.patch_size).astype(np.int64)
        return kind_oracle(ds, query, query.kind, patch_size=sizes)
    return global_oracle(ds, query, chunk_rows=chunk_rows, screen=screen, config=config, merge=merge)
