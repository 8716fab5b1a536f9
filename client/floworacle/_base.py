"""What the sync and asyncio clients have in common apart from transport: construction of the
configuration and the planning of each call (see ``_plans``)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from floworacle._config import DEFAULT_MESSAGE_BYTES, DEFAULT_TARGET, DEFAULT_TIMEOUT, ClientConfig, make_config
from floworacle._options import NearestOptions, OracleOptions, check_options
from floworacle._plans import Plan, RetryPolicy, build_nearest, build_oracle
from floworacle._results import Neighbors, Prediction
from floworacle.protocol import DEFAULT_MAX_REQUEST_ROWS, OUTPUT_NAMES, OracleError, RequestError

__all__ = ["ClientBase", "stream_item", "oracle_options", "nearest_options", "ALL_OUTPUTS"]

#: ``predict``'s default: every output.
ALL_OUTPUTS = OUTPUT_NAMES


class ClientBase:
    """Holds the configuration; plans calls. Subclasses send the plans."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        dataset: str | None = None,
        fingerprint: str | None = None,
        wire_dtype: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
        max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        secure: bool = False,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
        seed: int | None = None,
    ) -> None:
        self._config: ClientConfig = make_config(
            target,
            dataset=dataset,
            fingerprint=fingerprint,
            wire_dtype=wire_dtype,
            timeout=timeout,
            retry=retry,
            max_message_bytes=max_message_bytes,
            max_request_rows=max_request_rows,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            secure=secure,
            token=token,
            options=options,
        )
        self._rng = random.Random(seed)
        self._closed = False
        self._open(list(interceptors))

    def _open(self, interceptors: list[Any]) -> None:
        """Create the channels and stubs (one per target); the transport's job."""
        raise NotImplementedError

    @property
    def config(self) -> ClientConfig:
        """The resolved configuration (targets, defaults, retry policy, limits)."""
        return self._config

    def _plan_oracle(
        self, x_t: Any, t: Any, options: Mapping[str, Any], *, outputs: Sequence[str], top_k: Any = 0
    ) -> Plan[Prediction]:
        """The plan of an oracle call (``options``: an :class:`OracleOptions`; ``timeout`` is the caller's)."""
        opts = {k: v for k, v in options.items() if k != "timeout"}
        name, pin = self._config.resolve(opts.pop("dataset", None), opts.pop("fingerprint", None))
        wire = opts.pop("wire_dtype", None)
        return build_oracle(
            x_t,
            t,
            dataset=name,
            fingerprint=pin,
            wire_dtype=wire if wire is not None else self._config.wire_dtype,
            outputs=tuple(outputs),
            top_k=top_k,
            max_message_bytes=self._config.max_message_bytes,
            max_request_rows=self._config.max_request_rows,
            **opts,
        )

    def _plan_nearest(self, x: Any, k: Any, options: Mapping[str, Any]) -> Plan[Neighbors]:
        """The plan of a nearest call (``options``: a :class:`NearestOptions`)."""
        opts = {key: v for key, v in options.items() if key != "timeout"}
        name, pin = self._config.resolve(opts.pop("dataset", None), opts.pop("fingerprint", None))
        return build_nearest(
            x,
            k,
            dataset=name,
            fingerprint=pin,
            max_message_bytes=self._config.max_message_bytes,
            max_request_rows=self._config.max_request_rows,
            **opts,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error()


def closed_error() -> OracleError:
    """What a call on a closed client, or one that close() ended, raises."""
    return OracleError(grpc.StatusCode.CANCELLED, "this client is closed; create a new one")


def oracle_options(method: str, options: Mapping[str, Any]) -> Mapping[str, Any]:
    check_options(method, options, OracleOptions)
    return options


def nearest_options(method: str, options: Mapping[str, Any]) -> Mapping[str, Any]:
    check_options(method, options, NearestOptions)
    return options


def stream_item(item: Any) -> dict[str, Any]:
    """One element of a stream's input: ``(x_t, t)``, ``(x_t, t, labels)`` or a mapping with
    ``x_t``, ``t`` and optionally ``labels`` / ``exclude`` / ``coefficients``."""
    if isinstance(item, Mapping):
        allowed = {"x_t", "t", "labels", "exclude", "coefficients"}
        extra = set(item) - allowed
        if extra or "x_t" not in item:
            raise RequestError(
                f"a stream item mapping takes x_t and optionally t, labels, exclude, coefficients; got {sorted(item)}"
            )
        return {"t": None, **item}
    if isinstance(item, tuple) and len(item) in (2, 3):
        out = {"x_t": item[0], "t": item[1]}
        if len(item) == 3:
            out["labels"] = item[2]
        return out
    raise RequestError(
        "a stream item is (x_t, t), (x_t, t, labels) or a mapping with x_t, t, labels, exclude, coefficients"
    )
