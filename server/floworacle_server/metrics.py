"""Prometheus metrics of one Flow Oracle server: request, queue and compute latency, batch sizes, rows,
data sets, device memory and rejections, exposed on their own HTTP port.

Every label takes values from a fixed set (method names of the v1 API, gRPC status code names, a short
list of rejection reasons, the configured data sets, devices), so the number of series stays bounded
however clients behave. Each :class:`ServiceMetrics` owns its own ``CollectorRegistry`` so tests can run
several servers in one process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_ROWS_BUCKETS",
    "LATENCY_BUCKETS",
    "METHODS",
    "REJECT_REASONS",
    "ServiceMetrics",
]

#: RPC names of ``floworacle.v1.FlowOracle``; anything else is counted as ``other``.
METHODS: tuple[str, ...] = ("Oracle", "OracleStream", "Nearest", "ListDatasets", "DescribeDataset")

#: Why a request was refused before reaching the engine; anything else is counted as ``other``.
REJECT_REASONS: tuple[str, ...] = (
    "queue_full",
    "memory",
    "rows_cap",
    "unauthenticated",
    "invalid",
    "not_found",
    "deadline",
    "unavailable",
    "draining",
    "other",
)

#: Seconds, from 0.5 ms to 30 s: oracle calls over small data sets take milliseconds, a merged batch
#: over millions of rows takes seconds; the buckets are dense around 1-1000 ms where SLOs sit.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Rows per merged engine batch: powers of two from 1 to 65536 (the batcher's row cap range).
BATCH_ROWS_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(17))

_CODE_NAMES = frozenset(code.name for code in grpc.StatusCode)


def _method_label(method: str) -> str:
    # Accept both "Oracle" and the full path "/floworacle.v1.FlowOracle/Oracle".
    name = method.rsplit("/", 1)[-1]
    return name if name in METHODS else "other"


def _code_label(code: str) -> str:
    name = code.upper()
    if name.startswith("STATUSCODE."):
        name = name[len("STATUSCODE.") :]
    return name if name in _CODE_NAMES else "UNKNOWN"


def _reason_label(reason: str) -> str:
    return reason if reason in REJECT_REASONS else "other"


@dataclass(frozen=True)
class _DatasetSnapshot:
    name: str
    num_samples: int
    dim: int
    fingerprint: str
    resident_bytes: int
    #: (space, exact nearest-search backend) pairs, e.g. ("data", "faiss")
    nearest_backends: tuple[tuple[str, str], ...] = ()
    #: (space, index kind, build-time recall) of the loaded faiss indexes
    nearest_indexes: tuple[tuple[str, str, float], ...] = ()


class _DatasetCollector(Collector):
    """Yields the data set info and resident bytes from one immutable snapshot, so a scrape never sees
    a half-replaced list."""

    def __init__(self) -> None:
        self.snapshot: tuple[_DatasetSnapshot, ...] = ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.snapshot
        info = GaugeMetricFamily(
            "floworacle_dataset_info",
            "Data sets held by this server (value is always 1).",
            labels=["dataset", "samples", "dim", "fingerprint"],
        )
        resident = GaugeMetricFamily(
            "floworacle_dataset_resident_bytes",
            "Bytes of device (or host) memory the data set occupies.",
            labels=["dataset"],
        )
        backend = GaugeMetricFamily(
            "floworacle_nearest_backend_info",
            "The exact nearest-search screen chosen for each space of a data set (value is always 1).",
            labels=["dataset", "space", "backend"],
        )
        recall = GaugeMetricFamily(
            "floworacle_nearest_index_recall",
            "recall@k of a data set's faiss index, measured on held-out queries when it was built.",
            labels=["dataset", "space", "kind"],
        )
        for ds in snapshot:
            info.add_metric([ds.name, str(ds.num_samples), str(ds.dim), ds.fingerprint], 1.0)
            resident.add_metric([ds.name], float(ds.resident_bytes))
            for space, name in ds.nearest_backends:
                backend.add_metric([ds.name, space, name], 1.0)
            for space, kind, r in ds.nearest_indexes:
                recall.add_metric([ds.name, space, kind], r)
        yield info
        yield resident
        yield backend
        yield recall


def _host_memory() -> tuple[float, float]:
    """(resident set size of this process, physical memory of the machine) in bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = float(os.sysconf("SC_PHYS_PAGES") * page)
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            rss = float(int(f.read().split()[1]) * page)
    except OSError:
        import resource

        # ru_maxrss is the peak in KiB on Linux; the best available where /proc is missing.
        rss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return rss, total


class _DeviceMemoryCollector(Collector):
    """Reads memory at scrape time: host RSS / physical memory as device "cpu", and for every CUDA
    device the caching allocator's reserved bytes / device capacity. CUDA is only queried once this
    process has initialised it, so a CPU server on a GPU machine creates no CUDA context."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            "floworacle_device_memory_used_bytes",
            "Memory used by this process per device (CUDA: allocator reserved bytes; cpu: resident set size).",
            labels=["device"],
        )
        total = GaugeMetricFamily(
            "floworacle_device_memory_total_bytes",
            "Memory capacity per device (CUDA: device memory; cpu: physical memory of the machine).",
            labels=["device"],
        )
        rss, phys = _host_memory()
        used.add_metric(["cpu"], rss)
        total.add_metric(["cpu"], phys)
        for device, (u, t) in _cuda_memory().items():
            used.add_metric([device], u)
            total.add_metric([device], t)
        yield used
        yield total


def _cuda_memory() -> dict[str, tuple[float, float]]:
    try:
        import torch
    except ImportError:  # the metrics module must work in a torch-less process too
        return {}
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    out: dict[str, tuple[float, float]] = {}
    for i in range(torch.cuda.device_count()):
        reserved = float(torch.cuda.memory_reserved(i))
        capacity = float(torch.cuda.get_device_properties(i).total_memory)
        out[f"cuda:{i}"] = (reserved, capacity)
    return out


class ServiceMetrics:
    """All metrics of one server process, registered in ``self.registry``.

    The servicer and batcher call the ``observe_*``/``add_*``/``set_*`` methods; Prometheus scrapes
    ``start_http_server``'s port. Label values outside the fixed sets are folded into ``other`` (method,
    reason) or ``UNKNOWN`` (code) so that a misbehaving caller cannot blow up the series count.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "floworacle_requests",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self._request_duration = Histogram(
            "floworacle_request_duration_seconds",
            "Wall time of an RPC inside the server, from receipt to response.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._queue_duration = Histogram(
            "floworacle_queue_duration_seconds",
            "Time a request waited in the batcher queue before its batch started computing.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._compute_duration = Histogram(
            "floworacle_compute_duration_seconds",
            "Engine time of one merged batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._batch_rows = Histogram(
            "floworacle_batch_rows",
            "Rows (query points) in one merged engine batch.",
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self._rows = Counter(
            "floworacle_rows",
            "Query rows answered, by method.",
            ["method"],
            registry=r,
        )
        self._inflight = Gauge(
            "floworacle_inflight_requests",
            "RPCs currently being handled, by method.",
            ["method"],
            registry=r,
        )
        self._queue_depth = Gauge(
            "floworacle_queue_depth",
            "Requests waiting in the batcher queue.",
            registry=r,
        )
        self._refined = Counter(
            "floworacle_refined_candidates",
            "Candidate rows whose logits were recomputed in float64 because they were close competitors.",
            registry=r,
        )
        self._rejected = Counter(
            "floworacle_rejected_requests",
            "Requests refused before reaching the engine, by reason.",
            ["reason"],
            registry=r,
        )
        # Pre-create the fixed label sets so rate() has a zero to start from and dashboards show
        # every method and reason before the first event.
        for method in METHODS:
            self._rows.labels(method=method)
            self._inflight.labels(method=method)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason=reason)

        self._datasets = _DatasetCollector()
        r.register(self._datasets)
        r.register(_DeviceMemoryCollector())

        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC and its duration. ``code`` is a ``grpc.StatusCode`` name, e.g. "OK"."""
        m = _method_label(method)
        self._requests.labels(method=m, code=_code_label(code)).inc()
        self._request_duration.labels(method=m).observe(max(0.0, seconds))

    def observe_queue(self, seconds: float) -> None:
        """Record how long one request waited in the batcher queue."""
        self._queue_duration.observe(max(0.0, seconds))

    def observe_batch(self, rows: int, seconds: float, refined: int) -> None:
        """Record one engine call: rows in the merged batch, compute seconds, float64 candidates recomputed."""
        self._batch_rows.observe(rows)
        self._compute_duration.observe(max(0.0, seconds))
        if refined > 0:
            self._refined.inc(refined)

    def add_rows(self, method: str, rows: int) -> None:
        """Count ``rows`` query rows answered by ``method``."""
        if rows > 0:
            self._rows.labels(method=_method_label(method)).inc(rows)

    def inflight(self, method: str) -> AbstractContextManager[None]:
        """Context manager that counts the enclosed block as one in-flight RPC of ``method``."""
        return self._inflight_cm(_method_label(method))

    @contextlib.contextmanager
    def _inflight_cm(self, method: str) -> Iterator[None]:
        gauge = self._inflight.labels(method=method)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def set_queue_depth(self, depth: int) -> None:
        """Set the number of requests waiting in the batcher queue."""
        self._queue_depth.set(depth)

    def rejected(self, reason: str) -> None:
        """Count one request refused before the engine; ``reason`` is one of :data:`REJECT_REASONS`."""
        self._rejected.labels(reason=_reason_label(reason)).inc()

    def set_datasets(self, datasets: Iterable[Any]) -> None:
        """Replace the data set info with ``datasets`` (objects with .name, .num_samples, .dim,
        .fingerprint, .resident_bytes, and optionally .nearest_backends (space -> choice with
        .backend) and .nearest_indexes (space -> index with .kind, .recall))."""
        self._datasets.snapshot = tuple(
            _DatasetSnapshot(
                name=str(ds.name),
                num_samples=int(getattr(ds, "total_samples", ds.num_samples)),
                dim=int(ds.dim),
                fingerprint=str(ds.fingerprint),
                resident_bytes=int(ds.resident_bytes),
                nearest_backends=tuple(
                    (str(space), str(c.backend)) for space, c in getattr(ds, "nearest_backends", {}).items()
                ),
                nearest_indexes=tuple(
                    (str(space), str(ix.kind), float(ix.recall))
                    for space, ix in getattr(ds, "nearest_indexes", {}).items()
                ),
            )
            for ds in datasets
        )

    def start_http_server(
        self,
        port: int,
        addr: str = "0.0.0.0",
        *,
        tls: ssl.SSLContext | None = None,
        authorize: Callable[[str | None], str | None] | None = None,
    ) -> int:
        """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the bound port (``port=0``
        picks a free one). Raises RuntimeError if already started.

        Args:
            tls: serve HTTPS with this server context (the gRPC port's certificate; client
                certificates required when it verifies them).
            authorize: called with each request's ``Authorization`` header (None when absent);
                returns None to serve, or the message of a 401 answer.
        """
        with self._lock:
            if self._http is not None:
                raise RuntimeError("metrics HTTP server already started; call stop_http_server() first")
            httpd = _metrics_server(addr, port, self._guarded_app(authorize))
            if tls is not None:
                # the handshake runs in the request's thread (first read), not in the accept loop
                httpd.socket = tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
            thread = threading.Thread(target=httpd.serve_forever, name="floworacle-metrics", daemon=True)
            thread.start()
            self._http, self._http_thread = httpd, thread
            return int(httpd.server_port)

    def _guarded_app(self, authorize: Callable[[str | None], str | None] | None) -> Callable[..., Any]:
        app = make_wsgi_app(self.registry)
        if authorize is None:
            return app

        def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            problem = authorize(environ.get("HTTP_AUTHORIZATION"))
            if problem is not None:
                headers = [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Bearer realm="metrics"'),
                ]
                start_response("401 Unauthorized", headers)
                return [problem.encode()]
            return app(environ, start_response)

        return guarded

    def stop_http_server(self) -> None:
        """Stop the metrics HTTP server if it runs (idempotent)."""
        with self._lock:
            httpd, thread = self._http, self._http_thread
            self._http = self._http_thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5.0)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that breaks off the TLS handshake (plain HTTP to an HTTPS port, a port scan)
        or the connection is a client's problem: one debug line, not socketserver's traceback on
        stderr for every such request. Anything else is logged with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.debug("metrics: a request from %s ended before an answer: %s", client_address, exc)
            return
        log.exception("metrics: a request from %s failed", client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the log


def _metrics_server(addr: str, port: int, app: Callable[..., Any]) -> WSGIServer:
    """A threading WSGI server bound to ``addr:port`` (IPv6 literals included)."""

    class Server(_ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    httpd = Server((addr.strip("[]"), port), _QuietHandler)
    httpd.set_app(app)
    return httpd
