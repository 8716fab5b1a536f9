"""The tables of the protocol: the outputs an oracle request can ask for and the response fields
each fills, the precision modes, the nearest-search spaces, and the time conventions.

One row per fact; the SDK (argument names, result fields), the server (which fields to fill) and
the docs read these tables instead of restating them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from floworacle.v1 import oracle_pb2 as pb

__all__ = [
    "OutputSpec",
    "OUTPUTS",
    "OUTPUT_NAMES",
    "output_by_name",
    "output_by_enum",
    "BOUND_FIELDS",
    "KNN_FIELDS",
    "SAMPLE_OUTPUT_NAMES",
    "PRECISIONS",
    "SPACES",
    "CONVENTIONS",
]


@dataclass(frozen=True)
class OutputSpec:
    """One oracle output.

    Attributes:
        name: the name callers use (SDK ``outputs=``, engine output names).
        enum: its ``floworacle.v1.Output`` value.
        fields: the ``OracleResponse`` tensor fields it fills.
        kind: ``"sample"``: (B, *sample_shape) in the answer's float dtype; ``"per_query"``: (B,)
            float64; ``"topk"``: (B, k) int64 indices and float64 weights.
    """

    name: str
    enum: int
    fields: tuple[str, ...]
    kind: Literal["sample", "per_query", "topk"]


OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("velocity", pb.OUTPUT_VELOCITY, ("velocity",), "sample"),
    OutputSpec("x1_hat", pb.OUTPUT_X1_HAT, ("x1_hat",), "sample"),
    OutputSpec("eps_hat", pb.OUTPUT_EPS_HAT, ("eps_hat",), "sample"),
    OutputSpec("score", pb.OUTPUT_SCORE, ("score",), "sample"),
    OutputSpec("topk", pb.OUTPUT_TOPK, ("topk_indices", "topk_weights"), "topk"),
    OutputSpec("entropy", pb.OUTPUT_ENTROPY, ("entropy", "entropy_error_bound"), "per_query"),
    OutputSpec("ess", pb.OUTPUT_ESS, ("ess", "ess_error_bound"), "per_query"),
    OutputSpec("variance", pb.OUTPUT_VARIANCE, ("variance", "variance_error_bound"), "per_query"),
)
#: Every output name, in the order responses are filled.
OUTPUT_NAMES: tuple[str, ...] = tuple(o.name for o in OUTPUTS)
_BY_NAME = {o.name: o for o in OUTPUTS}
_BY_ENUM = {o.enum: o for o in OUTPUTS}

#: (B,) float64 error bounds every exact or fast oracle answer carries, whatever it asked for.
BOUND_FIELDS: tuple[str, ...] = ("x1_hat_error_bound", "velocity_error_bound")
#: (B,) float64 indicators a kNN answer carries instead (it claims no bound).
KNN_FIELDS: tuple[str, ...] = ("knn_weight_share", "knn_tail_bound", "knn_variance")
#: The per-sample outputs (velocity, x1_hat, eps_hat, score): everything that follows from a
#: posterior mean, so all that the kNN estimate and the kinds other than "global" can give (the
#: diagnostics describe the whole posterior over samples).
SAMPLE_OUTPUT_NAMES: tuple[str, ...] = tuple(o.name for o in OUTPUTS if o.kind == "sample")

#: Precision names and their ``floworacle.v1.Precision`` values (unspecified means exact).
PRECISIONS: dict[str, int] = {"exact": pb.PRECISION_EXACT, "fast": pb.PRECISION_FAST, "knn": pb.PRECISION_KNN}
#: Nearest-search spaces and their ``floworacle.v1.Space`` values (unspecified means data).
SPACES: dict[str, int] = {"data": pb.SPACE_DATA, "features": pb.SPACE_FEATURES}
#: Time conventions the SDK maps: ours (t = 0 noise) and the reversed one (s = 1 noise).
CONVENTIONS: tuple[str, ...] = ("standard", "reversed")


def output_by_name(name: str) -> OutputSpec | None:
    return _BY_NAME.get(name)


def output_by_enum(value: int) -> OutputSpec | None:
    return _BY_ENUM.get(value)
