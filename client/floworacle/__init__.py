"""Flow Oracle client SDK: exact flow-matching oracle targets and nearest training samples from a
Flow Oracle server, for numpy arrays and torch tensors.

Convention: t = 0 is noise, t = 1 is data, ``x_t = alpha_t x1 + sigma_t x0`` (see :mod:`floworacle.paths`);
pass ``convention="reversed"`` for code where s = 1 is noise (SD3, Flux, diffusers).
"""

from floworacle import paths, protocol
from floworacle._alloc import release_free_memory, tune_allocator
from floworacle._client import OracleClient
from floworacle._options import NearestOptions, OracleOptions
from floworacle._plans import RetryPolicy
from floworacle._results import DatasetInfo, NearestIndexInfo, Neighbors, Prediction
from floworacle.aio import AsyncOracleClient
from floworacle.protocol import CodecError, OracleError, RequestError

__all__ = [
    "OracleClient",
    "AsyncOracleClient",
    "OracleError",
    "RequestError",
    "CodecError",
    "RetryPolicy",
    "OracleOptions",
    "NearestOptions",
    "Prediction",
    "Neighbors",
    "DatasetInfo",
    "NearestIndexInfo",
    "paths",
    "protocol",
    "tune_allocator",
    "release_free_memory",
]
__version__ = "0.1.0"
