"""The oracle engine: streamed exact posterior means over a resident data set (imports only torch)."""

from floworacle_server.engine._types import OUTPUTS, Guidance, NearestResult, OracleQuery, OracleResult, Precision

__all__ = ["OUTPUTS", "Guidance", "NearestResult", "OracleQuery", "OracleResult", "Precision"]
