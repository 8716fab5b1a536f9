"""Assembles a Flow Oracle server from settings: data store, batcher, servicer, the standard
health service, server reflection, TLS and token authentication, and the metrics HTTP endpoint;
and drains it on shutdown.

The entry point (``floworacle serve``) only parses flags and calls :func:`create_server`; tests
call it directly with port 0 and talk to the server over a real channel.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from floworacle.protocol import SERVICE_NAME, STREAM_WINDOW_BYTES, rules, server_options
from floworacle_server.data import DatasetStore, ShardSpec, load_dataset
from floworacle_server.engine import calibrate_nearest_backends, flush_denormals
from floworacle_server.metrics import ServiceMetrics
from floworacle_server.service._auth import TokenAuthInterceptor, read_tokens, server_credentials_from_files
from floworacle_server.service._batcher import DynamicBatcher
from floworacle_server.service._budget import ByteBudget
from floworacle_server.service._gang import Gang
from floworacle_server.service._requests import Limits
from floworacle_server.service._servicer import FlowOracleServicer, add_servicer
from floworacle_server.settings import Settings

__all__ = [
    "OracleServer",
    "create_server",
    "build_store",
    "record_nearest_backends",
    "SERVICE_NAME",
    "dataset_health_name",
    "concurrent_rpc_cap",
    "HEALTH_MAX_MESSAGE_BYTES",
]

log = logging.getLogger(__name__)

#: Seconds after the bytes in flight came back to 0 at which the heap is trimmed a second time.
_RELEASE_AGAIN_S = 1.0

#: Largest message the open health server reads: a health request is a service name of a few dozen
#: bytes. gRPC refuses a longer one from its 5-byte length prefix, before the body is buffered.
HEALTH_MAX_MESSAGE_BYTES = 4096
#: Calls the open health server runs at once (probes and balancers' watches); each holds at most a
#: stream window of unread bytes, so 1,024 of them hold at most 64 MiB.
HEALTH_MAX_RPCS = 1024
#: The fewest concurrent calls a server accepts, whatever its byte budget.
MIN_CONCURRENT_RPCS = 64


def concurrent_rpc_cap(max_inflight_bytes: int) -> int:
    """Calls a server runs at once: ``max_inflight_bytes // STREAM_WINDOW_BYTES`` (at least
    MIN_CONCURRENT_RPCS), so that the request bytes gRPC may buffer for calls the server is not
    reading, one stream window each, add up to at most the byte budget itself (2,048 calls for the
    default 128 MiB). Calls beyond it are refused by gRPC with RESOURCE_EXHAUSTED before their
    message is read."""
    return max(MIN_CONCURRENT_RPCS, max_inflight_bytes // STREAM_WINDOW_BYTES)


def dataset_health_name(dataset: str) -> str:
    """Health-check service name of one data set: ``floworacle.v1.FlowOracle/<dataset>``."""
    return f"{SERVICE_NAME}/{dataset}"


def record_nearest_backends(store: DatasetStore) -> None:
    """Which exact nearest screen is faster on this machine, per data set and space: measured once
    by the engine (logged) and recorded in the data set, where searches and DescribeDataset read it."""
    for ds in store:
        ds.nearest_backends.update(calibrate_nearest_backends(ds))


def build_store(settings: Settings, shard: ShardSpec | None = None) -> DatasetStore:
    """Load the data sets the settings name (the embedded ``digits`` on the CPU when none).

    An index directory is verified against the fingerprint in its manifest while it loads; one
    whose files changed since ``floworacle index build`` raises instead of being served. With
    ``shard`` (a gang's rank) each data set is that rank's shard: an index directory reads only its
    rows (rank 0 verifies the fingerprint), anything else loads whole and is cut.

    Raises:
        ValueError: a data argument that cannot be loaded (the message says why).
    """
    store = DatasetStore()
    verify = shard is None or shard.rank == 0
    # The first-run experience (no data: the embedded digits) is on the CPU unless a device was asked for.
    device = "cpu" if not settings.data and settings.device == "auto" else settings.resolved_device()
    for name, path in settings.data_sets():
        labels = settings.labels_for(name)
        store.add(
            load_dataset(
                path,
                name=name,
                labels=labels,
                device=device,
                dtype=settings.dtype,
                verify=verify,
                shard=shard,
                image_shape=settings.image_shape_for(name),
            )
        )
    return store


class _Health(health.aio.HealthServicer):
    """The standard health service. Its NOT_FOUND for an unknown name says which names exist (the
    stock one answers it without details) when ``list_names``: on the gRPC port, whose callers
    carry a token when tokens are on."""

    def __init__(self, names: Callable[[], list[str]], list_names: bool = True) -> None:
        super().__init__()
        self._names = names
        self._list_names = list_names

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self.check(request, context, self._list_names)

    async def check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext, list_names: bool
    ) -> Any:
        """Check, answering an unknown name with NOT_FOUND that lists the known ones if ``list_names``."""
        known = self._names()
        if request.service not in known:
            if list_names:
                listed = ", ".join(repr(n) for n in known)
                hint = f"this server answers {listed} (one per data set: '{SERVICE_NAME}/<data set>')"
            else:
                hint = f"ask for '' (the server), '{SERVICE_NAME}' or '{SERVICE_NAME}/<data set>'"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown health name {rules.echo(request.service)}; {hint}")
        return await super().Check(request, context)


class _OpenHealth(health_pb2_grpc.HealthServicer):
    """The health service of the open health port: the same statuses as ``main`` (one state, set
    once), answered without listing data set names unless ``list_names``."""

    def __init__(self, main: _Health, list_names: bool) -> None:
        self._main = main
        self._list_names = list_names

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._main.check(request, context, self._list_names)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._main.Watch(request, context)


def engine_thread_setup() -> None:
    """First thing on the thread that runs the engine (the batcher's, a gang worker's main one):
    flush-to-zero for it and torch's OpenMP workers, since exp() of very negative float32 logits
    makes denormals, which many CPUs compute slowly (logged when it could not be verified)."""
    state = flush_denormals()
    if not state.verified:
        log.warning("flush-to-zero could not be verified on the engine thread (%s); denormals may be slow", state)


class OracleServer:
    """A running (or ready-to-run) Flow Oracle gRPC server.

    Attributes:
        settings: the settings it was built from.
        store: the data sets it serves.
        metrics: its Prometheus metrics (own registry).
        batcher: the dynamic batcher (``engine_calls`` counts merged engine calls).
        auth: the token interceptor when ``auth_tokens_file`` is set (``auth.reload()`` re-reads
            the file), else None.
        port: the bound gRPC port (after :meth:`start`).
        health_port: the bound port of the open health server (``settings.health_port``), or None.
        metrics_port: the bound metrics port, or None when metrics HTTP is off.
        gang: rank 0's membership of a gang (its data sets are shards), or None.
        failed: set when the gang broke (health is NOT_SERVING then); ``floworacle serve``
            exits non-zero on it so the orchestrator restarts the group.
    """

    def __init__(
        self,
        settings: Settings,
        store: DatasetStore,
        *,
        metrics: ServiceMetrics | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        server_credentials: grpc.ServerCredentials | None = None,
        gang: Gang | None = None,
    ) -> None:
        if len(store) == 0:
            raise ValueError("the server needs at least one data set")
        self.settings = settings
        self.store = store
        self.gang = gang
        self.failed = asyncio.Event()
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.batcher = DynamicBatcher(
            max_batch_rows=settings.max_batch_rows,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_requests=settings.max_queue_requests,
            max_inflight_rows=settings.max_inflight_rows,
            metrics=self.metrics,
            engine_thread_setup=engine_thread_setup,
        )
        self.health = _Health(self.health_names)
        self.auth: TokenAuthInterceptor | None = None
        if settings.auth_tokens_file is not None:
            # Health on the gRPC port needs a token too: an open method there reads messages of up
            # to max_message_bytes (gRPC has no per-method limit on a server), so the open health
            # checks that probes need are served on health_port, which reads at most 4 KiB.
            self.auth = TokenAuthInterceptor(settings.auth_tokens_file, metrics=self.metrics, open_prefixes=())
        # Authentication runs first, so no other interceptor sees an unauthenticated call.
        self._interceptors = (*((self.auth,) if self.auth is not None else ()), *interceptors)
        if server_credentials is None:
            server_credentials = server_credentials_from_files(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
        self._credentials = server_credentials
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._servicer: FlowOracleServicer | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` as bound (the wildcard host stays as configured)."""
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.port}"

    def health_names(self) -> list[str]:
        """Every name the health service answers: "" (overall), the service, one per data set."""
        return ["", SERVICE_NAME, *(dataset_health_name(n) for n in self.store.names())]

    async def start(self) -> None:
        """Bind the port, start serving and mark every health name SERVING.

        Raises:
            RuntimeError: the address cannot be bound.
        """
        s = self.settings
        record_nearest_backends(self.store)
        self.batcher.start()
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=server_options(s.max_message_bytes),
            maximum_concurrent_rpcs=concurrent_rpc_cap(s.max_inflight_bytes),
        )
        servicer = FlowOracleServicer(
            self.store,
            self.batcher,
            self.metrics,
            limits=Limits(max_request_rows=s.max_request_rows, max_message_bytes=s.max_message_bytes),
            chunk_rows=s.chunk_rows,
            screen=s.screen,
            max_stream_inflight=s.max_stream_inflight,
            max_stream_inflight_bytes=s.max_stream_inflight_bytes,
            budget=ByteBudget(s.max_inflight_bytes, on_idle=self._released),
            auth=self.auth,
            gang=self.gang,
            on_gang_broken=self._gang_broken,
        )
        self._servicer = servicer
        add_servicer(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if s.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                server,
            )
        try:
            self.port = self._bind(server, s.port, "--port")
            if s.health_port is not None:
                self._health_server = self._open_health_server()
                self.health_port = self._bind(self._health_server, s.health_port, "--health-port")
        except RuntimeError:
            await self.batcher.close()
            raise
        await server.start()
        self._server = server
        if self._health_server is not None:
            await self._health_server.start()
        for name in self.health_names():
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.set_datasets(self.store)
        if s.metrics_port >= 0:
            host = s.metrics_host if s.metrics_host is not None else s.host
            try:
                self.metrics_port = self.metrics.start_http_server(
                    s.metrics_port, host, tls=self._metrics_tls(), authorize=self._metrics_authorize()
                )
            except OSError as exc:
                await server.stop(None)
                if self._health_server is not None:
                    await self._health_server.stop(None)
                await self.batcher.close()
                raise RuntimeError(
                    f"cannot serve metrics on {host}:{s.metrics_port}: {exc} "
                    "(use --metrics-port 0 for any free port, -1 for none)"
                ) from exc

    def _bind(self, server: grpc.aio.Server, port: int, flag: str) -> int:
        """Bind ``port`` on the settings' host (with the TLS credentials, if any); the bound port.

        Raises:
            RuntimeError: the address cannot be bound (the message says why, if known).
        """
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host  # IPv6 literal
        bind = f"{host}:{port}"
        hint = f"is the port in use? (use {flag} 0 for any free port)"
        try:
            if self._credentials is not None:
                bound = server.add_secure_port(bind, self._credentials)
            else:
                bound = server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind {bind}: {exc}; {hint}") from exc
        if not bound:
            raise RuntimeError(f"cannot bind {bind}; {hint}")
        return int(bound)

    def _open_health_server(self) -> grpc.aio.Server:
        """The open health server of ``health_port``: grpc.health.v1 only, no interceptors, messages
        of at most HEALTH_MAX_MESSAGE_BYTES (gRPC refuses a longer one before reading its body)."""
        server = grpc.aio.server(
            options=server_options(HEALTH_MAX_MESSAGE_BYTES), maximum_concurrent_rpcs=HEALTH_MAX_RPCS
        )
        open_health = _OpenHealth(self.health, list_names=self.auth is None)
        health_pb2_grpc.add_HealthServicer_to_server(open_health, server)
        return server

    def _gang_broken(self, reason: str) -> None:
        """A rank of the gang failed: every health name NOT_SERVING, and ``failed`` set (once)."""
        if self.failed.is_set():
            return
        log.error("the gang broke (%s): answering UNAVAILABLE, health NOT_SERVING; exiting", reason)
        self.failed.set()
        for name in self.health_names():
            asyncio.ensure_future(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))

    def _released(self, freed: int) -> None:
        """Once nothing is in flight after a burst, hand the heap's free blocks back to the system
        (the pinned trim threshold would otherwise keep up to 256 MiB of them resident)."""
        if freed >= 32 << 20 and self.settings.tune_allocator:
            from floworacle import release_free_memory

            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, release_free_memory)
            # and once more when gRPC has let go of the ended calls' buffers, which it frees after
            # the last bytes of the budget came back (cancelled streams, unread answers)
            loop.call_later(_RELEASE_AGAIN_S, loop.run_in_executor, None, release_free_memory)

    def _metrics_tls(self) -> ssl.SSLContext | None:
        """The metrics endpoint's TLS context: the gRPC port's certificate (and client CA)."""
        s = self.settings
        if not s.metrics_tls or s.tls_cert is None or s.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca is not None:
            ctx.load_verify_locations(s.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _metrics_authorize(self) -> Callable[[str | None], str | None] | None:
        """With metrics_auth: the gRPC port's bearer-token check on /metrics (revocations included)."""
        auth = self.auth
        if not self.settings.metrics_auth or auth is None:
            return None
        return lambda header: auth.check([] if header is None else [("authorization", header)])

    async def stop(self, grace: float | None = None) -> None:
        """Drain: every health name goes NOT_SERVING, new RPCs are refused (after
        ``shutdown_delay_s``), in-flight ones get ``grace`` seconds (default ``grace_period_s``) to
        finish and are cancelled after that; then the batcher and the metrics endpoint stop.
        Safe to call more than once (later calls wait for the first)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._drain(self.settings.grace_period_s if grace is None else grace)
            )
        await asyncio.shield(self._stopping)

    async def _drain(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_s > 0 and self._server is not None:
            await asyncio.sleep(self.settings.shutdown_delay_s)
        if self._server is not None and self._servicer is not None:
            # stop() refuses new RPCs at once and gives the running ones `grace` seconds. Once our
            # own RPCs are done, whatever is left (health Watch streams) is cut right away rather
            # than holding the shutdown for the whole grace period.
            stopping = asyncio.ensure_future(self._server.stop(grace))
            idle = asyncio.ensure_future(self._servicer.wait_idle())
            await asyncio.wait({stopping, idle}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                await self._server.stop(None)
            idle.cancel()
            await stopping
        if self._health_server is not None:  # last: probes see NOT_SERVING until the port closes
            await self._health_server.stop(None)
        await self.batcher.close()
        self.metrics.stop_http_server()

    async def wait_for_termination(self) -> None:
        """Return when the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()
        if self._health_server is not None:
            await self._health_server.wait_for_termination()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)


def create_server(
    settings: Settings,
    store: DatasetStore | None = None,
    *,
    metrics: ServiceMetrics | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    server_credentials: grpc.ServerCredentials | None = None,
    gang: Gang | None = None,
) -> OracleServer:
    """Build (not start) a server: the given store, or the data sets the settings name (a gang's
    rank 0: its shards, with ``gang``).

    TLS comes from ``settings.tls_cert`` / ``tls_key`` (mutual TLS with ``tls_client_ca``) and
    bearer-token authentication from ``settings.auth_tokens_file``.

    Args:
        interceptors: extra ``grpc.aio`` server interceptors, run in order after authentication
            and before the servicer.
        server_credentials: TLS credentials that replace the ones the settings name; None with
            no TLS settings serves plaintext.

    Raises:
        ValueError: data that cannot be loaded (an index whose contents no longer match its
            fingerprint included), unreadable TLS files, or a tokens file without tokens.
    """
    # Check TLS files and the tokens file before loading data, which may take minutes.
    if server_credentials is None:
        server_credentials = server_credentials_from_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if settings.auth_tokens_file is not None:
        read_tokens(settings.auth_tokens_file)
    return OracleServer(
        settings,
        store if store is not None else build_store(settings),
        metrics=metrics,
        interceptors=interceptors,
        server_credentials=server_credentials,
        gang=gang,
    )
