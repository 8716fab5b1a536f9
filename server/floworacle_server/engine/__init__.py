"""The oracle engine: streamed exact posterior means over a resident data set (imports only torch)."""

from floworacle_server.engine._nearest import nearest, posterior_nearest
from floworacle_server.engine._oracle import REACH_MARGIN, SCREEN_DTYPES, compute_partials, default_chunk_rows, oracle
from floworacle_server.engine._partials import Partials, Posterior
from floworacle_server.engine._types import OUTPUTS, Guidance, NearestResult, OracleQuery, OracleResult, Precision

__all__ = [
    "OUTPUTS",
    "REACH_MARGIN",
    "SCREEN_DTYPES",
    "Guidance",
    "NearestResult",
    "OracleQuery",
    "OracleResult",
    "Partials",
    "Posterior",
    "Precision",
    "compute_partials",
    "default_chunk_rows",
    "nearest",
    "posterior_nearest",
    "oracle",
]
