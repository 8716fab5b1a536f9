"""``floworacle serve``: parse flags into :class:`~floworacle_server.settings.Settings`, start the
server, log where it listens and what it serves, and drain on SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from floworacle_server.settings import Settings, add_flags, load_settings

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
    add_flags(p)  # one flag per setting, generated from the model
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


def _on_sighup(auth: TokenAuthInterceptor | None) -> None:
    """SIGHUP re-reads the tokens file (open streams are checked against the new set on their next
    message); without one there is nothing to reload, and the signal is logged and ignored."""
    if auth is None:
        log.info("SIGHUP: nothing to reload (no auth_tokens_file); ignored")
        return
    try:
        log.info("SIGHUP: %d tokens loaded from %s", auth.reload(), auth.tokens_file)
    except ValueError as exc:
        log.error("SIGHUP: %s; keeping the %d tokens loaded before", exc, auth.token_count)


async def serve(settings: Settings) -> int:
    """Run a server until SIGTERM or SIGINT, then drain (health NOT_SERVING, in-flight requests
    finish within ``grace_period_s``) and return 0. SIGHUP re-reads the auth tokens file (and is
    logged and ignored without one)."""
    from floworacle_server.service._server import create_server

    loop = asyncio.get_running_loop()
    # Signals are handled from the start: SIGTERM while the data loads drains right after start-up,
    # and SIGHUP never falls back to the default action (which would kill the process).
    stop = asyncio.Event()
    auth: list[TokenAuthInterceptor | None] = [None]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _on_sighup(auth[0]))
    if settings.tune_allocator:
        from floworacle import tune_allocator

        log.info("allocator thresholds pinned: %s", "yes" if tune_allocator() else "no (not glibc)")
    try:
        server = create_server(settings)  # loading data may take a while; nothing is bound yet
        await server.start()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        raise
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

    auth[0] = server.auth
    if server.auth is not None:
        log.info("token authentication on: %d tokens from %s", server.auth.token_count, server.auth.tokens_file)
    try:
        await stop.wait()
        log.info("draining (grace %.1f s)", settings.grace_period_s)
        await server.stop(settings.grace_period_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
