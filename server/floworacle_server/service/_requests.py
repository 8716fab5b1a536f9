"""Reading a request: the wire message to the protocol's query, checked against the data set it asks.

Every rule is the protocol's (:meth:`OracleQuery.from_request` / :meth:`~OracleQuery.check` with the
data set's facts); a broken rule raises :class:`~floworacle.protocol.RequestError`, whose code and
message the servicer sends. Failures that are not about the request's contents (an unknown data
set, a fingerprint pin that does not match) are :class:`RpcFailure`. Everything runs before a
request reaches the batcher, so one bad request cannot fail the others it would have been merged
with; the engine only asserts its invariants.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import grpc

from floworacle.protocol import DEFAULT_MAX_MESSAGE_BYTES, NearestQuery, OracleQuery, RequestError, pb, rules
from floworacle_server.data import Dataset, DatasetStore

__all__ = ["RpcFailure", "Limits", "Work", "resolve_dataset", "read_oracle", "read_nearest"]


class RpcFailure(Exception):
    """A request that fails with ``code``; ``message`` tells the caller what to change.

    ``reason`` is the rejection label for the metrics; ``trailing`` is extra trailing metadata
    (e.g. the retry hint ``grpc-retry-pushback-ms`` on a full queue).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "invalid",
        trailing: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.trailing = trailing


@dataclass(frozen=True)
class Limits:
    """Per-request limits from the settings: rows per request, bytes per message (the answer's too)."""

    max_request_rows: int
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


Q = TypeVar("Q", OracleQuery, NearestQuery)


@dataclass(frozen=True)
class Work(Generic[Q]):
    """One request's query with the data set it asks, as the batcher carries it (queries of one key
    share an engine call)."""

    dataset: Dataset
    query: Q
    #: where the runner writes the answer (a stream's answer message), or None for a new message
    into: Any = None
    #: the answer's size (:meth:`OracleQuery.answer_bytes`), known before it is computed
    answer_bytes: int = 0

    @property
    def rows(self) -> int:
        return self.query.rows

    @property
    def key(self) -> Hashable:
        return (type(self.query).__name__, self.dataset.name, id(self.dataset), self.query.key)


def resolve_dataset(store: DatasetStore, name: str, fingerprint: str = "") -> Dataset:
    """The named (or default) data set; NOT_FOUND listing the names, FAILED_PRECONDITION on a
    fingerprint pin that does not match."""
    try:
        ds = store.get(name)
    except KeyError as exc:
        msg = exc.args[0] if exc.args else f"unknown data set {name!r}"
        raise RpcFailure(grpc.StatusCode.NOT_FOUND, str(msg), reason="not_found") from None
    if fingerprint and fingerprint != ds.fingerprint:
        raise RpcFailure(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"data set {ds.name!r} has fingerprint {ds.fingerprint}, but the request pinned {rules.echo(fingerprint)}; "
            "the server holds different data than you expect (update the pin or point at the right server)",
            reason="invalid",
        )
    return ds


def _read(cls: type[Q], req: Any, store: DatasetStore, limits: Limits) -> Work[Q]:
    """The checked query of a request with its data set; an answer too large to send is refused
    here, before anything is computed (raises :class:`RpcFailure` or
    :class:`~floworacle.protocol.RequestError`)."""
    ds = resolve_dataset(store, req.dataset, req.fingerprint)
    facts = ds.facts
    q = cls.from_request(req, limits.max_request_rows).check(facts)
    size = q.answer_bytes(facts)
    if size > limits.max_message_bytes:
        raise RequestError(
            f"the answer to these {q.rows} queries would take {size} bytes, over this server's message limit of "
            f"{limits.max_message_bytes} (max_message_bytes): send fewer rows per request, {q.shrink_hint} (the SDK "
            "splits batches to fit by itself)",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return Work(ds, replace(q, dataset=ds.name, fingerprint=ds.fingerprint), answer_bytes=size)


def read_oracle(req: pb.OracleRequest, store: DatasetStore, limits: Limits) -> Work[OracleQuery]:
    """The checked query of an :class:`OracleRequest` with its data set (see :func:`_read`)."""
    return _read(OracleQuery, req, store, limits)


def read_nearest(req: pb.NearestRequest, store: DatasetStore, limits: Limits) -> Work[NearestQuery]:
    """The checked query of a :class:`NearestRequest` with its data set (see :func:`_read`). With t
    (or custom coefficients) the points are x_t and the search ranks samples by posterior weight."""
    return _read(NearestQuery, req, store, limits)
