"""The oracle engine: streamed exact posterior means over a resident data set (imports only torch).

Rooms: ``_bounds`` (the one rounding-error model), ``_config`` (per-device block sizes),
``_batch`` (per-batch state), ``_screen`` (screening GEMM and candidates), ``_refine`` (float64
logits from differences), ``_dense`` (dense float64 and fast passes), ``_partials`` (mergeable
sums), ``_passes`` (routing), ``_assemble`` (the outputs), ``_nearest`` (nearest samples),
``_flush`` (flush-to-zero), ``_knn_target`` (the sublinear nearest-neighbour estimate).
"""

from floworacle_server.engine._assemble import compute_partials, oracle
from floworacle_server.engine._backend import NearestInfo, calibrate_nearest_backend, nearest_info
from floworacle_server.engine._bounds import DENSE_LOGIT_TOL, REACH_MARGIN, SCREEN_DTYPES
from floworacle_server.engine._config import CPU, CUDA, EngineConfig
from floworacle_server.engine._flush import FlushState, flush_denormals
from floworacle_server.engine._index_build import IndexSpec, build_nearest_index, parse_index_spec
from floworacle_server.engine._knn_target import KNN_OUTPUTS, KnnOracleResult, KnnTarget, knn_oracle, knn_target
from floworacle_server.engine._nearest import check_search, nearest, posterior_nearest
from floworacle_server.engine._partials import Partials, Posterior
from floworacle_server.engine._types import OUTPUTS, Guidance, NearestResult, OracleQuery, OracleResult, Precision

__all__ = [
    "CPU",
    "CUDA",
    "DENSE_LOGIT_TOL",
    "KNN_OUTPUTS",
    "OUTPUTS",
    "REACH_MARGIN",
    "SCREEN_DTYPES",
    "EngineConfig",
    "FlushState",
    "Guidance",
    "IndexSpec",
    "KnnOracleResult",
    "KnnTarget",
    "NearestInfo",
    "NearestResult",
    "OracleQuery",
    "OracleResult",
    "Partials",
    "Posterior",
    "Precision",
    "build_nearest_index",
    "calibrate_nearest_backend",
    "check_search",
    "compute_partials",
    "flush_denormals",
    "knn_oracle",
    "knn_target",
    "nearest",
    "nearest_info",
    "parse_index_spec",
    "oracle",
    "posterior_nearest",
]
