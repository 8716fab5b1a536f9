"""Client configuration shared by the sync and asyncio clients: targets, credentials, metadata,
defaults, and the per-call resolution of data set, fingerprint pin and deadline."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from floworacle._plans import RetryPolicy
from floworacle.protocol import DEFAULT_MAX_MESSAGE_BYTES, FLOAT_DTYPES, RequestError, channel_options

__all__ = ["ClientConfig", "make_config"]

#: grpc's client-side round robin over every address a name resolves to (DNS, Kubernetes
#: headless Services); harmless for a name with one address.
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# A server that comes back should be reachable within our retry budget, not after gRPC's
# default reconnect backoff (which grows to two minutes).
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class ClientConfig:
    targets: tuple[str, ...]
    dataset: str
    fingerprint: str
    wire_dtype: str | None
    timeout: float | None
    retry: RetryPolicy
    max_message_bytes: int
    max_request_rows: int
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]

    def resolve(self, dataset: str | None, fingerprint: str | None) -> tuple[str, str]:
        """(data set, fingerprint pin) of a call: the call's own, else the client's defaults (the
        client's pin applies only to the client's default data set)."""
        name = self.dataset if dataset is None else dataset
        if fingerprint is not None:
            return name, fingerprint
        return name, self.fingerprint if name == self.dataset else ""

    def deadline(self, timeout: float | None) -> tuple[float | None, float | None]:
        """(timeout used, absolute monotonic deadline) of a call; None means no deadline."""
        used = self.timeout if timeout is None else timeout
        if used is None:
            return None, None
        if not used > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {used}")
        return used, time.monotonic() + used


def make_config(
    target: str | Sequence[str],
    *,
    dataset: str | None,
    fingerprint: str | None,
    wire_dtype: str | None,
    timeout: float | None,
    retry: RetryPolicy | None,
    max_message_bytes: int,
    max_request_rows: int,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    secure: bool,
    token: str | None,
    options: Sequence[tuple[str, Any]],
) -> ClientConfig:
    if isinstance(target, str):
        # "a:1,b:2" is a list of addresses; a URI ("ipv4:a:1,b:2", "dns:///h:p") is grpc's to resolve.
        uri = target.startswith(_URI_SCHEMES)
        targets = tuple(p.strip() for p in target.split(",")) if "," in target and not uri else (target,)
    else:
        targets = tuple(target)
    if not targets or any(not t for t in targets):
        raise ValueError(f"target must be 'host:port', 'dns:///host:port' or a list of addresses, got {target!r}")
    if wire_dtype is not None and wire_dtype not in FLOAT_DTYPES:
        raise ValueError(f"wire_dtype must be None or one of {list(FLOAT_DTYPES)}, got {wire_dtype!r}")
    if max_request_rows < 1:
        raise ValueError(f"max_request_rows must be >= 1, got {max_request_rows}")
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mTLS needs both private_key and certificate_chain")
    credentials = None
    if secure or root_certificates is not None or private_key is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    metadata: tuple[tuple[str, str], ...] = ()
    if token is not None:
        if not token or any(c in token for c in "\r\n"):
            raise ValueError("token must be a non-empty string without line breaks")
        metadata = (("authorization", f"Bearer {token}"),)
    opts = [*channel_options(max_message_bytes), *_RECONNECT, ("grpc.service_config", _ROUND_ROBIN), *options]
    return ClientConfig(
        targets=targets,
        dataset=dataset or "",
        fingerprint=fingerprint or "",
        wire_dtype=wire_dtype,
        timeout=timeout,
        retry=retry or RetryPolicy(),
        max_message_bytes=max_message_bytes,
        max_request_rows=max_request_rows,
        credentials=credentials,
        metadata=metadata,
        options=tuple(opts),
    )


DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES
