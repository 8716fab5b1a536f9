"""Who may talk to the server: TLS / mutual-TLS server credentials from PEM files, and bearer-token
authentication as a ``grpc.aio`` server interceptor (tokens from a file, constant-time comparison).

Health checks stay open so that load balancers and Kubernetes probes need no secret; every other
method, reflection included, needs ``authorization: Bearer <token>`` when tokens are configured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc

__all__ = [
    "OPEN_METHOD_PREFIXES",
    "TokenAuthInterceptor",
    "read_tokens",
    "server_credentials_from_files",
]

log = logging.getLogger(__name__)

#: Methods answered without a token: the standard health service (probes, load balancers).
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)

_MISSING = (
    "this server requires authentication: send the metadata 'authorization: Bearer <token>' "
    "(SDK: OracleClient(address, token=...)); ask the operator for a token from the server's auth_tokens_file"
)
_MALFORMED = "the 'authorization' metadata must read 'Bearer <token>' (one space, then the token)"
_REJECTED = (
    "the bearer token is not accepted by this server; check that you send the right token "
    "(it may have been revoked) and ask the operator for a valid one"
)


class _Metrics(Protocol):
    def rejected(self, reason: str) -> None: ...


def read_tokens(path: str | Path) -> tuple[str, ...]:
    """The tokens in ``path``: one per line, surrounding whitespace stripped, blank lines and lines
    starting with ``#`` ignored.

    Raises:
        ValueError: the file cannot be read or holds no token.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the auth tokens file {str(p)!r}: {exc}; fix auth_tokens_file") from exc
    tokens = tuple(
        dict.fromkeys(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    )
    if not tokens:
        raise ValueError(
            f"the auth tokens file {str(p)!r} holds no token; add one per line, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' >> FILE`"
        )
    return tokens


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps hmac.compare_digest from leaking the token length.
    return hashlib.sha256(token.encode("utf-8")).digest()


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path!r}: {exc}") from exc
    if b"-----BEGIN" not in data:
        raise ValueError(f"the {what} file {path!r} is not PEM (no '-----BEGIN' line)")
    return data


def _check_pair(cert: str, key: str) -> None:
    """Load the pair with OpenSSL as a server would, so that a key of another certificate (or an
    unusable file) is named now: gRPC only fails later, when it binds the port, without the reason.

    Raises:
        ValueError: the key does not belong to the certificate, or either cannot be parsed.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # a password callback that gives none: a key encrypted in a way not caught above fails here
        # instead of prompting on the terminal
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}"
        if "KEY_VALUES_MISMATCH" in text:
            raise ValueError(
                f"the TLS key {key!r} does not belong to the certificate {cert!r} (their public keys differ); "
                "give tls_key the private key the certificate was issued for"
            ) from None
        raise ValueError(
            f"the TLS certificate {cert!r} and key {key!r} cannot be used together ({exc.reason or exc}); "
            "check that both are PEM and belong together"
        ) from None


def server_credentials_from_files(
    cert: str | None, key: str | None, client_ca: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS server credentials from PEM files, or None when ``cert`` and ``key`` are unset.

    Args:
        cert: certificate chain of the server (PEM).
        key: private key of ``cert`` (PEM).
        client_ca: CA bundle (PEM); when given, every client must present a certificate signed by
            it (mutual TLS) or the handshake fails.

    Raises:
        ValueError: only one of cert / key, client_ca without cert, an unreadable / non-PEM file, or a
            key that does not belong to the certificate.
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both tls_cert and tls_key")
    pair = (_read_pem(key, "TLS key"), _read_pem(cert, "TLS certificate"))
    if b"ENCRYPTED" in pair[0]:
        raise ValueError(f"the TLS key {key!r} is encrypted; give tls_key an unencrypted PEM key")
    _check_pair(cert, key)
    ca = _read_pem(client_ca, "TLS client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def _deny_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler that aborts with UNAUTHENTICATED before reading any request message.

    It is registered as request-streaming whatever the method's kind: gRPC then starts it without
    receiving the (possibly huge) request first, and the status goes out at once; the stream's
    bytes are discarded by the transport, not buffered. The response side keeps the method's kind.
    """

    async def deny(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield None  # pragma: no cover - abort raises; the yield makes this an async generator

    if handler is not None and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    return grpc.stream_unary_rpc_method_handler(deny)  # unknown methods too: nothing is revealed


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets an RPC through only with ``authorization: Bearer <token>`` for a configured token.

    The presented token is compared with *every* configured token by ``hmac.compare_digest`` over
    SHA-256 digests, so the time taken depends neither on where the first differing byte is, nor on
    which token matched, nor on the token's length. Methods under ``open_prefixes`` (health) need
    no token. Failures answer UNAUTHENTICATED with a message saying what to send and are counted as
    ``rejected("unauthenticated")``.

    Args:
        tokens_file: file of accepted tokens (see :func:`read_tokens`); read now and on :meth:`reload`.
        metrics: sink for rejection counts.
        open_prefixes: method-name prefixes that need no token.
    """

    def __init__(
        self,
        tokens_file: str | Path,
        *,
        metrics: _Metrics | None = None,
        open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES,
    ) -> None:
        self.tokens_file = Path(tokens_file)
        self._metrics = metrics
        self._open = tuple(open_prefixes)
        self._digests: tuple[bytes, ...] = ()
        self.reload()

    @property
    def token_count(self) -> int:
        """Number of distinct accepted tokens."""
        return len(self._digests)

    def reload(self) -> int:
        """Re-read the tokens file (e.g. on SIGHUP) and return the number of tokens. A file that
        cannot be read or holds no token raises ValueError and leaves the current tokens in place."""
        self._digests = tuple(_digest(t) for t in read_tokens(self.tokens_file))
        return len(self._digests)

    def check(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """None when ``metadata`` carries an accepted token, else the message to answer with."""
        value = None
        for key, val in metadata or ():
            if key.lower() == "authorization":
                value = val.decode("latin-1") if isinstance(val, bytes) else str(val)
                break
        if value is None:
            return _MISSING
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _MALFORMED
        given = _digest(token)
        ok = False
        for known in self._digests:  # no early exit: every token is compared
            ok |= hmac.compare_digest(given, known)
        return None if ok else _REJECTED

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        if self._metrics is not None:
            self._metrics.rejected("unauthenticated")
        log.info("refused %s: %s", method, problem.split(";")[0])
        return _deny_handler(await continuation(handler_call_details), problem)
