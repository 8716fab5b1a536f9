"""Run a real Flow Oracle server in a background thread, for tests, examples and benchmarks.

with serve_in_thread() as srv:                 # embedded digits, CPU, free ports
    client = OracleClient(srv.address)
    ...
    srv.server.batcher.engine_calls            # merged engine calls so far
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from floworacle_server.data import DatasetStore
from floworacle_server.service._server import OracleServer, create_server
from floworacle_server.settings import Settings

__all__ = ["RunningServer", "serve_in_thread"]


@dataclass
class RunningServer:
    """A server running in a background thread.

    Attributes:
        address: ``"127.0.0.1:PORT"`` to connect to.
        port: the gRPC port.
        metrics_port: the metrics HTTP port (None when off).
        server: the :class:`OracleServer` (its ``batcher`` counts engine calls).
        loop: the server's event loop (use :meth:`call` to run coroutines on it).
    """

    address: str
    port: int
    metrics_port: int | None
    server: OracleServer
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout: float | None = 30.0) -> Any:
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        """Drain and stop the server now (idempotent); the context manager does this on exit."""
        self.call(self.server.stop(grace), timeout=grace + 30.0)


@contextmanager
def serve_in_thread(
    settings: Settings | None = None,
    store: DatasetStore | None = None,
    *,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
    server_credentials: grpc.ServerCredentials | None = None,
    startup_timeout: float = 60.0,
    port: int = 0,
) -> Iterator[RunningServer]:
    """Start a real server on 127.0.0.1 with a free gRPC port (and a free metrics port unless
    ``settings.metrics_port == -1``) on its own event loop in a daemon thread; stop it on exit.

    Args:
        settings: server settings (default: embedded digits on the CPU); host and ports are
            overridden as above.
        store: data sets to serve instead of the ones the settings name.
        port: the gRPC port (0: a free one); a fixed port lets a test restart a server where
            its clients expect it.
    """
    base = settings if settings is not None else Settings(device="cpu")
    update: dict[str, Any] = {"host": "127.0.0.1", "port": port, "metrics_host": "127.0.0.1"}
    if base.metrics_port != -1:
        update["metrics_port"] = 0
    s = base.model_copy(update=update)
    server = create_server(s, store, interceptors=interceptors, server_credentials=server_credentials)

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []
    done = asyncio.Event()

    async def main() -> None:
        try:
            await server.start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        await done.wait()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="floworacle-test-server", daemon=True)
    thread.start()
    if not ready.wait(startup_timeout):
        raise RuntimeError(f"the test server did not start within {startup_timeout} s")
    if failure:
        thread.join(5.0)
        raise failure[0]
    if server.port is None:  # start() returned without binding: cannot happen, but say so clearly
        raise RuntimeError("the test server started without a port")
    running = RunningServer(
        address=f"127.0.0.1:{server.port}",
        port=server.port,
        metrics_port=server.metrics_port,
        server=server,
        loop=loop,
    )
    try:
        yield running
    finally:
        try:
            running.stop(grace=1.0)
        finally:
            loop.call_soon_threadsafe(done.set)
            thread.join(30.0)
