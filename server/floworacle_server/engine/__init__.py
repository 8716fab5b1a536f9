"""The oracle engine: streamed exact posterior means over a resident data set (imports only torch)."""

from floworacle_server.engine._backend import NearestInfo, calibrate_nearest_backend, nearest_info
from floworacle_server.engine._index_build import IndexSpec, build_nearest_index, parse_index_spec
from floworacle_server.engine._nearest import nearest, posterior_nearest
from floworacle_server.engine._oracle import REACH_MARGIN, SCREEN_DTYPES, compute_partials, default_chunk_rows, oracle
from floworacle_server.engine._partials import Partials, Posterior
from floworacle_server.engine._types import OUTPUTS, Guidance, NearestResult, OracleQuery, OracleResult, Precision

__all__ = [
    "OUTPUTS",
    "REACH_MARGIN",
    "SCREEN_DTYPES",
    "Guidance",
    "IndexSpec",
    "NearestInfo",
    "NearestResult",
    "OracleQuery",
    "OracleResult",
    "Partials",
    "Posterior",
    "Precision",
    "build_nearest_index",
    "calibrate_nearest_backend",
    "compute_partials",
    "default_chunk_rows",
    "nearest",
    "nearest_info",
    "parse_index_spec",
    "posterior_nearest",
    "oracle",
]
