"""``floworacle serve``: parse flags into :class:`~floworacle_server.settings.Settings`, start the
server, log where it listens and what it serves, and drain on SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from floworacle_server.settings import CONFIG_ENV, Settings, load_settings

if TYPE_CHECKING:  # the parser is built for every floworacle command; grpc loads only to serve
    from floworacle_server.service._auth import TokenAuthInterceptor

__all__ = ["register", "serve"]

log = logging.getLogger("floworacle.serve")


def register(sub: Any) -> None:
    """Add ``serve`` to the floworacle parser."""
    p = sub.add_parser(
        "serve",
        help="serve the oracle over gRPC (no --data: the embedded digits data set on the CPU)",
        description="Serve exact flow-matching oracle and nearest-sample queries over gRPC. Every flag "
        "also reads from FLOWORACLE_<FLAG> (e.g. FLOWORACLE_PORT) and from a YAML file (--config); "
        "flags win over the environment, which wins over the file.",
    )
    # Every default is None so that load_settings can tell "not given" from a value.
    p.add_argument(
        "--data",
        action="append",
        metavar="[NAME=]PATH",
        help="data set to serve (repeatable): 'digits', an index directory or a .npy/.npz/.safetensors/.pt file",
    )
    p.add_argument("--labels", action="append", metavar="[NAME=]PATH", help="labels file for a data set (repeatable)")
    p.add_argument("--name", help="name of a data set given as a bare PATH (default: the file stem)")
    p.add_argument("--host", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9090; 0 = any free; -1 = off)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto; digits default to cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="storage dtype (default float32)")
    p.add_argument("--chunk-rows", type=int, help="engine chunk size in data rows (default: engine's choice)")
    p.add_argument(
        "--screen",
        choices=["float32", "bfloat16", "float16"],
        help="screening GEMM precision (GPU tensor cores: bfloat16; exact answers either way)",
    )
    p.add_argument("--max-batch-rows", type=int, help="rows merged into one engine call (default 4096)")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest wait for requests to merge with (default 2)")
    p.add_argument("--max-queue-requests", type=int, help="bounded queue length (default 1024)")
    p.add_argument("--max-request-rows", type=int, help="rows one request may carry (default 16384)")
    p.add_argument("--max-message-bytes", type=int, help="gRPC message limit in bytes (default 256 MiB)")
    p.add_argument(
        "--max-inflight-rows", type=int, help="rows queued + computing at once; beyond: retry hint (default 65536)"
    )
    p.add_argument(
        "--reflection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gRPC server reflection (default: on without --auth-tokens-file, off with it)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate chain; with --tls-key turns on TLS")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM", help="CA of client certificates: require them (mutual TLS)")
    p.add_argument(
        "--auth-tokens-file",
        metavar="FILE",
        help="accepted bearer tokens, one a line; every RPC but health needs one (re-read on SIGHUP)",
    )
    p.add_argument("--grace-period-s", type=float, help="seconds in-flight requests get on SIGTERM (default 30)")
    p.add_argument("--shutdown-delay-s", type=float, help="seconds NOT_SERVING before the port closes (default 0)")
    p.add_argument(
        "--tune-allocator",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pin glibc's malloc thresholds so large buffers are reused across calls (default on)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--config", metavar="FILE", help=f"YAML settings file (or {CONFIG_ENV})")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except (ValidationError, ValueError) as exc:
        print(f"floworacle serve: invalid settings: {exc}")
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(settings))
    except (ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1


def _reload_tokens(auth: TokenAuthInterceptor) -> None:
    try:
        log.info("SIGHUP: %d tokens loaded from %s", auth.reload(), auth.tokens_file)
    except ValueError as exc:
        log.error("SIGHUP: %s; keeping the %d tokens loaded before", exc, auth.token_count)


async def serve(settings: Settings) -> int:
    """Run a server until SIGTERM or SIGINT, then drain (health NOT_SERVING, in-flight requests
    finish within ``grace_period_s``) and return 0. SIGHUP re-reads the auth tokens file."""
    from floworacle_server.service._server import create_server

    loop = asyncio.get_running_loop()
    if settings.tune_allocator:
        from floworacle import tune_allocator

        log.info("allocator thresholds pinned: %s", "yes" if tune_allocator() else "no (not glibc)")
    server = create_server(settings)  # loading data may take a while; nothing is bound yet
    await server.start()
    for ds in server.store:
        default = " (default)" if ds.name == server.store.default_name else ""
        log.info(
            "data set %s%s: %d x %s %s on %s, %s",
            ds.name,
            default,
            ds.num_samples,
            list(ds.sample_shape),
            ds.storage_dtype,
            ds.device,
            ds.fingerprint,
        )
    metrics = f", metrics on :{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    log.info("Flow Oracle serving on %s%s", server.address, metrics)

    if server.auth is not None:
        log.info("token authentication on: %d tokens from %s", server.auth.token_count, server.auth.tokens_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    auth = server.auth
    if auth is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload_tokens, auth)
    try:
        await stop.wait()
        log.info("draining (grace %.1f s)", settings.grace_period_s)
        await server.stop(settings.grace_period_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
