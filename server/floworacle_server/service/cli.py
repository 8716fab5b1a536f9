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
    from floworacle_server.data import DatasetStore
    from floworacle_server.service._auth import TokenAuthInterceptor
    from floworacle_server.service._gang import Gang

__all__ = ["register", "serve"]

log = logging.getLogger("floworacle.serve")

#: malloc arenas of a server process, so that memory returns after a burst (why and what it was
#: measured to save: floworacle.tune_allocator and docs/reliability.md).
SERVER_ARENAS = 2


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
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if settings.world_size > 1:
        fmt = f"%(asctime)s %(levelname)s rank {settings.rank} %(name)s: %(message)s"
    logging.basicConfig(level=settings.log_level, format=fmt)
    try:
        if settings.world_size > 1:
            return _serve_gang(settings)
        return asyncio.run(serve(settings))
    except (ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1


def _serve_gang(settings: Settings) -> int:
    """One rank of a gang (WORLD_SIZE > 1, e.g. under torchrun): join, load this rank's shards,
    then rank 0 serves gRPC and the others compute the batches it sends until it stops them."""
    import torch

    from floworacle_server.data import ShardSpec
    from floworacle_server.service._gang import Gang, GangBroken, GangSpec
    from floworacle_server.service._server import build_store, engine_thread_setup, record_nearest_backends

    device = settings.resolved_device() if settings.data or settings.device != "auto" else "cpu"
    if device == "cuda":  # one GPU per rank of a node
        device = f"cuda:{settings.local_rank}"
        settings = settings.model_copy(update={"device": device})
    backend = settings.gang_backend
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    spec = GangSpec(
        settings.rank, settings.world_size, settings.local_rank, settings.master_addr, settings.master_port,
        settings.gang_timeout_s, backend,
    )  # fmt: skip
    gang = Gang(spec, torch.device(device))
    if settings.rank != 0:  # launchers signal every rank of a group at once: rank 0 decides when to stop
        signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: waiting for rank 0 to stop the gang"))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    gang.join()
    try:
        store = build_store(settings, shard=ShardSpec(settings.rank, settings.world_size))
        gang.complete_facts(store)
        for ds in store:
            log.info("shard of %s: %d of %d rows on %s", ds.name, ds.num_samples, ds.total_samples, ds.device)
        if settings.rank == 0:
            return asyncio.run(serve(settings, store=store, gang=gang))
        record_nearest_backends(store)  # as rank 0 does at start-up, before the first search waits for it
        engine_thread_setup()  # this thread runs the engine here
        try:
            gang.serve_commands(store, settings.chunk_rows, settings.screen)
        except GangBroken as exc:
            log.error("the gang broke (%s); exiting so the group restarts", exc)
            return 1
        return 0
    finally:
        gang.leave()


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


async def serve(settings: Settings, store: DatasetStore | None = None, gang: Gang | None = None) -> int:
    """Run a server until SIGTERM or SIGINT, then drain (health NOT_SERVING, in-flight requests
    finish within ``grace_period_s``) and return 0. SIGHUP re-reads the auth tokens file (and is
    logged and ignored without one). A gang's rank 0 (``gang`` and its shards in ``store``) also
    stops the other ranks after the drain, and returns 1 at once when the gang breaks."""
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

        tuned = tune_allocator(arena_max=SERVER_ARENAS)
        log.info(
            "allocator thresholds pinned: %s", f"yes, {SERVER_ARENAS} malloc arenas" if tuned else "no (not glibc)"
        )
    try:
        server = create_server(settings, store, gang=gang)  # loading data may take a while; nothing is bound yet
        await server.start()
        if gang is not None:

            def broken(reason: str) -> None:  # from the heartbeat's thread
                loop.call_soon_threadsafe(server._gang_broken, reason)

            gang.start_heartbeat(broken)
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
            ds.total_samples,
            list(ds.sample_shape),
            ds.storage_dtype,
            ds.device,
            ds.fingerprint,
        )
    if server.health_port is not None:
        log.info(
            "open health checks on %s:%d (grpc.health.v1 only, messages up to 4 KiB)", settings.host, server.health_port
        )
    elif server.auth is not None:
        log.warning("tokens are on and no --health-port is set: health checks need a token too (probes: --health-port)")
    metrics = f", metrics on :{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    log.info("Flow Oracle serving on %s%s", server.address, metrics)

    auth[0] = server.auth
    if server.auth is not None:
        log.info("token authentication on: %d tokens from %s", server.auth.token_count, server.auth.tokens_file)
    failed = asyncio.ensure_future(server.failed.wait())
    try:
        await asyncio.wait({asyncio.ensure_future(stop.wait()), failed}, return_when=asyncio.FIRST_COMPLETED)
        if server.failed.is_set():  # the gang broke: nothing can be answered; let the group restart
            await server.stop(0.0)
            log.error("stopped: the gang broke")
            return 1
        log.info("draining (grace %.1f s)", settings.grace_period_s)
        await server.stop(settings.grace_period_s)
        if gang is not None:
            await loop.run_in_executor(None, gang.stop_workers)
    finally:
        failed.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
