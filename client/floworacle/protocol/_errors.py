"""The one exception type of Flow Oracle calls, and its subclass for requests that break a rule.

Both the SDK and the server use them: the SDK raises :class:`OracleError` for every failed call
(a rule broken locally is a :class:`RequestError` with the server's code and message); the server
turns a :class:`RequestError` into the gRPC status it names.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["OracleError", "RequestError"]


class OracleError(Exception):
    """A failed Flow Oracle call.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``), e.g. ``INVALID_ARGUMENT`` or ``UNAVAILABLE``.
        details: the server's (or transport's) message saying what went wrong.
        retry_after: seconds the server asked the caller to wait before retrying, if it said so.
    """

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.details, self.retry_after))


class RequestError(OracleError, ValueError):
    """A request that breaks one of the protocol's rules (:mod:`floworacle.protocol`); ``details``
    says what to change. The code is INVALID_ARGUMENT unless the rule says otherwise (a batch over
    the server's row cap is RESOURCE_EXHAUSTED). Also a ``ValueError``."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(code, details)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.details, self.code))
