"""The one place where gRPC failures are translated into the SDK's one exception type,
:class:`~floworacle.OracleError` (defined in :mod:`floworacle.protocol`, shared with the server)."""

from __future__ import annotations

from typing import Any

import grpc

from floworacle.protocol import OracleError

__all__ = ["OracleError", "translate_rpc_error", "error_from_code", "retry_hint_seconds"]

#: Trailing-metadata keys read as a server's retry hint, in order. ``grpc-retry-pushback-ms`` is
#: gRPC's own pushback key; ``retry-after-ms`` and ``retry-after`` (seconds) are accepted too.
RETRY_HINT_KEYS_MS = ("grpc-retry-pushback-ms", "retry-after-ms")
RETRY_HINT_KEYS_S = ("retry-after",)

_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def retry_hint_seconds(metadata: Any) -> float | None:
    """The retry hint in trailing metadata (sequence of (key, value) pairs), in seconds, or None."""
    if not metadata:
        return None
    values = {str(k).lower(): v for k, v in metadata}
    for key in RETRY_HINT_KEYS_MS:
        if key in values:
            try:
                return max(0.0, float(values[key]) / 1000.0)
            except (TypeError, ValueError):
                return None
    for key in RETRY_HINT_KEYS_S:
        if key in values:
            try:
                return max(0.0, float(values[key]))
            except (TypeError, ValueError):
                return None
    return None


def translate_rpc_error(exc: grpc.RpcError) -> OracleError:
    """Any ``grpc.RpcError`` (sync or asyncio) -> :class:`OracleError` with code, details, retry hint."""
    code_fn = getattr(exc, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(exc, "details", None)
    details = (details_fn() if callable(details_fn) else None) or str(exc)
    meta_fn = getattr(exc, "trailing_metadata", None)
    try:
        metadata = meta_fn() if callable(meta_fn) else None
    except Exception:  # a channel closed mid-call has no metadata; the code still says enough
        metadata = None
    return OracleError(code, details, retry_hint_seconds(metadata))


def error_from_code(code: int, message: str) -> OracleError:
    """A per-item error of the stream (google.rpc.Code integer and message) -> :class:`OracleError`."""
    return OracleError(_CODE_BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN), message)
