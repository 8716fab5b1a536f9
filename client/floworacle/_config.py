"""Client configuration shared by the sync and asyncio clients: targets, credentials, metadata,
defaults, and the per-call resolution of data set, fingerprint pin and deadline."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from floworacle._plans import RetryPolicy
from floworacle.protocol import DEFAULT_MAX_MESSAGE_BYTES, FLOAT_DTYPES, RequestError, channel_options

__all__ = ["ClientConfig", "make_config"]

#: grpc's client-side round robin over every address a target resolves to (a list of addresses,
#: DNS names, Kubernetes headless Services); harmless for a name with one address.
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
    #: The one gRPC target the channel dials (a URI gRPC resolves, or host:port).
    target: str
    #: What the caller gave, for messages (the addresses of a list stay readable).
    display_target: str
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


def _split_hostport(entry: str) -> tuple[str, str]:
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{entry!r} is not 'host:port' (IPv6: '[::1]:50051')")
    return host.strip("[]"), port


def resolve_target(target: str | Sequence[str]) -> tuple[str, str, str | None]:
    """(gRPC target, display name, authority) of what a caller gives as ``target``.

    A URI (``dns:///svc:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``unix:...``) and a
    single ``host:port`` go to gRPC as they are. A list of addresses (a sequence, or one string
    ``"a:50051,b:50051"``) becomes one ``ipv4:`` / ``ipv6:`` target of every address its hosts
    resolve to now, so that gRPC's own ``round_robin`` policy balances the calls over them; the
    first host is the channel's authority (the name TLS checks). A DNS name that resolves to every
    replica (``dns:///`` of a Kubernetes headless Service) is re-resolved by gRPC itself.
    """
    if isinstance(target, str):
        if target.startswith(_URI_SCHEMES) or "," not in target:
            if not target.strip():
                raise ValueError(
                    f"target must be 'host:port', 'dns:///host:port' or a list of addresses, got {target!r}"
                )
            return target, target, None
        entries = [p.strip() for p in target.split(",")]
    else:
        entries = [str(p).strip() for p in target]
    if not entries or any(not e for e in entries):
        raise ValueError(f"target must be 'host:port', 'dns:///host:port' or a list of addresses, got {target!r}")
    if len(entries) == 1:
        return entries[0], entries[0], None
    v4: list[str] = []
    v6: list[str] = []
    for entry in entries:
        host, port = _split_hostport(entry)
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {host!r} of the target list {entries}: {exc}") from None
        for family, _, _, _, addr in infos:
            if family == socket.AF_INET and f"{addr[0]}:{port}" not in v4:
                v4.append(f"{addr[0]}:{port}")
            elif family == socket.AF_INET6 and f"[{addr[0]}]:{port}" not in v6:
                v6.append(f"[{addr[0]}]:{port}")
    uri = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
    return uri, ",".join(entries), _split_hostport(entries[0])[0]


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
    uri, display, authority = resolve_target(target)
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
    opts = [*channel_options(max_message_bytes), *_RECONNECT, ("grpc.service_config", _ROUND_ROBIN)]
    if authority is not None:
        opts.append(("grpc.default_authority", authority))
    opts.extend(options)
    return ClientConfig(
        target=uri,
        display_target=display,
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
