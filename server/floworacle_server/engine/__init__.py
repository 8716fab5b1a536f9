"""The oracle engine: streamed exact posterior means over a resident data set (imports only torch).

Rooms: ``_bounds`` (the one rounding-error model), ``_config`` (per-device block sizes),
``_batch`` (per-batch state), ``_screen`` (screening GEMM and candidates), ``_refine`` (float64
logits from differences), ``_dense`` (dense float64 and fast passes), ``_partials`` (mergeable
sums), ``_passes`` (routing), ``_assemble`` (the outputs), ``_nearest`` (nearest samples),
``_flush`` (flush-to-zero); the oracles that generalise: ``_patches`` (what the patch oracles
share), ``_local`` (local oracle and the patch pass), ``_equivariant`` (equivariant local),
``_linear`` (Gaussian / Wiener), ``_kinds`` (one entry point for every kind and the outputs).
"""

from floworacle_server.engine._assemble import compute_partials, oracle
from floworacle_server.engine._backend import NearestInfo, calibrate_nearest_backend, nearest_info
from floworacle_server.engine._bounds import DENSE_LOGIT_TOL, REACH_MARGIN, SCREEN_DTYPES
from floworacle_server.engine._config import CPU, CUDA, EngineConfig
from floworacle_server.engine._equivariant import equivariant_oracle
from floworacle_server.engine._flush import FlushState, flush_denormals
from floworacle_server.engine._index_build import IndexSpec, build_nearest_index, parse_index_spec
from floworacle_server.engine._kinds import KINDS, PATCH_KINDS, kind_oracle, kind_x1, outputs_from_x1, patch_schedule
from floworacle_server.engine._linear import linear_oracle
from floworacle_server.engine._local import local_oracle
from floworacle_server.engine._nearest import check_search, nearest, posterior_nearest
from floworacle_server.engine._partials import Partials, Posterior
from floworacle_server.engine._patches import PatchConfig, PatchResult, check_patch_size, max_patch_size
from floworacle_server.engine._types import OUTPUTS, Guidance, NearestResult, OracleQuery, OracleResult, Precision

__all__ = [
    "CPU",
    "CUDA",
    "DENSE_LOGIT_TOL",
    "KINDS",
    "PATCH_KINDS",
    "OUTPUTS",
    "REACH_MARGIN",
    "SCREEN_DTYPES",
    "EngineConfig",
    "FlushState",
    "Guidance",
    "IndexSpec",
    "NearestInfo",
    "NearestResult",
    "OracleQuery",
    "OracleResult",
    "PatchConfig",
    "PatchResult",
    "Partials",
    "Posterior",
    "Precision",
    "build_nearest_index",
    "calibrate_nearest_backend",
    "check_patch_size",
    "check_search",
    "compute_partials",
    "equivariant_oracle",
    "flush_denormals",
    "kind_oracle",
    "kind_x1",
    "linear_oracle",
    "local_oracle",
    "max_patch_size",
    "nearest",
    "nearest_info",
    "parse_index_spec",
    "oracle",
    "outputs_from_x1",
    "patch_schedule",
    "posterior_nearest",
]
