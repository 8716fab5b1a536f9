"""ServiceMetrics: what the exposition text says after each call, parsed with prometheus_client's parser."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from floworacle_server.metrics import (
    BATCH_ROWS_BUCKETS,
    LATENCY_BUCKETS,
    METHODS,
    REJECT_REASONS,
    ServiceMetrics,
)


def samples(m: ServiceMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """All samples of the registry as {(sample name, labels): value}."""
    text = generate_latest(m.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: ServiceMetrics, name: str, **labels: str) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


def families(m: ServiceMetrics) -> dict[str, str]:
    text = generate_latest(m.registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


@dataclass
class FakeDataset:
    name: str
    num_samples: int
    dim: int
    fingerprint: str
    resident_bytes: int


def test_metric_names_and_types_follow_conventions() -> None:
    fams = families(ServiceMetrics())
    expected = {
        "floworacle_requests": "counter",
        "floworacle_request_duration_seconds": "histogram",
        "floworacle_queue_duration_seconds": "histogram",
        "floworacle_compute_duration_seconds": "histogram",
        "floworacle_batch_rows": "histogram",
        "floworacle_rows": "counter",
        "floworacle_inflight_requests": "gauge",
        "floworacle_queue_depth": "gauge",
        "floworacle_dataset_info": "gauge",
        "floworacle_dataset_resident_bytes": "gauge",
        "floworacle_device_memory_used_bytes": "gauge",
        "floworacle_device_memory_total_bytes": "gauge",
        "floworacle_refined_candidates": "counter",
        "floworacle_rejected_requests": "counter",
    }
    for name, kind in expected.items():
        assert fams.get(name) == kind, f"{name}: {fams.get(name)}"
    # The text format names counters' samples with _total.
    text = generate_latest(ServiceMetrics().registry).decode()
    assert "floworacle_rejected_requests_total{" in text
    assert "floworacle_refined_candidates_total " in text


def test_observe_request_counts_by_method_and_code_and_fills_buckets() -> None:
    m = ServiceMetrics()
    m.observe_request("Oracle", "OK", 0.003)
    m.observe_request("Oracle", "OK", 0.2)
    m.observe_request("Nearest", "INVALID_ARGUMENT", 0.0001)
    assert value(m, "floworacle_requests_total", method="Oracle", code="OK") == 2
    assert value(m, "floworacle_requests_total", method="Nearest", code="INVALID_ARGUMENT") == 1
    assert value(m, "floworacle_request_duration_seconds_count", method="Oracle") == 2
    assert value(m, "floworacle_request_duration_seconds_sum", method="Oracle") == pytest.approx(0.203)
    # Cumulative buckets: 0.003 s falls in le=0.005 but not le=0.0025; 0.2 s in le=0.25.
    assert value(m, "floworacle_request_duration_seconds_bucket", method="Oracle", le="0.0025") == 0
    assert value(m, "floworacle_request_duration_seconds_bucket", method="Oracle", le="0.005") == 1
    assert value(m, "floworacle_request_duration_seconds_bucket", method="Oracle", le="0.1") == 1
    assert value(m, "floworacle_request_duration_seconds_bucket", method="Oracle", le="0.25") == 2
    assert value(m, "floworacle_request_duration_seconds_bucket", method="Oracle", le="+Inf") == 2


def test_label_values_stay_in_fixed_sets() -> None:
    m = ServiceMetrics()
    m.observe_request("/floworacle.v1.FlowOracle/Nearest", "OK", 0.01)  # full gRPC path
    m.observe_request("DropTables", "NOT_A_CODE", 0.01)
    m.observe_request("Oracle", str(grpc.StatusCode.UNAVAILABLE), 0.01)  # "StatusCode.UNAVAILABLE"
    m.rejected("some reason made up by a client")
    m.add_rows("NoSuchMethod", 7)
    assert value(m, "floworacle_requests_total", method="Nearest", code="OK") == 1
    assert value(m, "floworacle_requests_total", method="other", code="UNKNOWN") == 1
    assert value(m, "floworacle_requests_total", method="Oracle", code="UNAVAILABLE") == 1
    assert value(m, "floworacle_rejected_requests_total", reason="other") == 1
    assert value(m, "floworacle_rows_total", method="other") == 7
    methods = {dict(k[1]).get("method") for k in samples(m) if k[0] == "floworacle_requests_total"}
    assert methods <= set(METHODS) | {"other"}
    codes = {dict(k[1]).get("code") for k in samples(m) if k[0] == "floworacle_requests_total"}
    assert codes <= {c.name for c in grpc.StatusCode}


def test_fixed_label_sets_are_present_before_any_event() -> None:
    m = ServiceMetrics()
    for method in METHODS:
        assert value(m, "floworacle_rows_total", method=method) == 0
        assert value(m, "floworacle_inflight_requests", method=method) == 0
    for reason in REJECT_REASONS:
        assert value(m, "floworacle_rejected_requests_total", reason=reason) == 0


def test_batch_queue_rows_and_refinement() -> None:
    m = ServiceMetrics()
    m.observe_queue(0.02)
    m.observe_batch(rows=300, seconds=0.4, refined=5)
    m.observe_batch(rows=1, seconds=0.001, refined=0)
    m.add_rows("Oracle", 300)
    m.add_rows("Oracle", 0)
    assert value(m, "floworacle_queue_duration_seconds_count") == 1
    assert value(m, "floworacle_queue_duration_seconds_sum") == pytest.approx(0.02)
    assert value(m, "floworacle_compute_duration_seconds_count") == 2
    assert value(m, "floworacle_compute_duration_seconds_sum") == pytest.approx(0.401)
    assert value(m, "floworacle_batch_rows_sum") == 301
    assert value(m, "floworacle_batch_rows_bucket", le="1.0") == 1
    assert value(m, "floworacle_batch_rows_bucket", le="256.0") == 1
    assert value(m, "floworacle_batch_rows_bucket", le="512.0") == 2
    assert value(m, "floworacle_refined_candidates_total") == 5
    assert value(m, "floworacle_rows_total", method="Oracle") == 300


def test_inflight_gauge_follows_the_block_even_on_error() -> None:
    m = ServiceMetrics()
    with m.inflight("Oracle"):
        with m.inflight("Oracle"):
            assert value(m, "floworacle_inflight_requests", method="Oracle") == 2
        assert value(m, "floworacle_inflight_requests", method="Oracle") == 1
    with pytest.raises(RuntimeError), m.inflight("Nearest"):
        raise RuntimeError("handler failed")
    assert value(m, "floworacle_inflight_requests", method="Oracle") == 0
    assert value(m, "floworacle_inflight_requests", method="Nearest") == 0


def test_queue_depth_gauge() -> None:
    m = ServiceMetrics()
    m.set_queue_depth(17)
    assert value(m, "floworacle_queue_depth") == 17
    m.set_queue_depth(0)
    assert value(m, "floworacle_queue_depth") == 0


def test_datasets_info_and_resident_bytes_are_replaced_not_accumulated() -> None:
    m = ServiceMetrics()
    m.set_datasets([FakeDataset("digits", 1797, 64, "ab12", 460_032), FakeDataset("cifar", 50_000, 3072, "cd34", 7)])
    info = {k: v for k, v in samples(m).items() if k[0] == "floworacle_dataset_info"}
    assert info == {
        (
            "floworacle_dataset_info",
            frozenset({("dataset", "digits"), ("samples", "1797"), ("dim", "64"), ("fingerprint", "ab12")}),
        ): 1.0,
        (
            "floworacle_dataset_info",
            frozenset({("dataset", "cifar"), ("samples", "50000"), ("dim", "3072"), ("fingerprint", "cd34")}),
        ): 1.0,
    }
    assert value(m, "floworacle_dataset_resident_bytes", dataset="digits") == 460_032
    m.set_datasets([FakeDataset("cifar", 50_000, 3072, "cd34", 9)])
    names = {dict(k[1])["dataset"] for k in samples(m) if k[0].startswith("floworacle_dataset_")}
    assert names == {"cifar"}
    assert value(m, "floworacle_dataset_resident_bytes", dataset="cifar") == 9


def _vmrss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_cpu_memory_is_process_rss_and_machine_total() -> None:
    m = ServiceMetrics()
    used = value(m, "floworacle_device_memory_used_bytes", device="cpu")
    total = value(m, "floworacle_device_memory_total_bytes", device="cpu")
    assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # Read independently from /proc/self/status; allow for allocation between the two reads.
    assert abs(used - _vmrss_bytes()) < 64 * 2**20
    assert 0 < used < total
    # Collected at scrape time: a 200 MiB allocation shows up in the next scrape.
    block = bytearray(200 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert value(m, "floworacle_device_memory_used_bytes", device="cpu") > used + 150 * 2**20
    del block


def test_instances_have_separate_registries() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_request("Oracle", "OK", 0.01)
    assert value(a, "floworacle_requests_total", method="Oracle", code="OK") == 1
    assert ("floworacle_requests_total", frozenset({("method", "Oracle"), ("code", "OK")})) not in samples(b)
    shared = CollectorRegistry()
    c = ServiceMetrics(shared)
    assert c.registry is shared
    with pytest.raises(ValueError):  # names are taken in that registry
        ServiceMetrics(shared)


def test_buckets_cover_milliseconds_to_ten_seconds_and_1_to_65536_rows() -> None:
    assert min(LATENCY_BUCKETS) <= 0.001 and max(LATENCY_BUCKETS) >= 10.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert BATCH_ROWS_BUCKETS[0] == 1 and BATCH_ROWS_BUCKETS[-1] == 65536
    assert all(b2 == 2 * b1 for b1, b2 in zip(BATCH_ROWS_BUCKETS, BATCH_ROWS_BUCKETS[1:], strict=False))


def test_http_server_serves_the_registry_and_stops() -> None:
    m = ServiceMetrics()
    m.observe_request("Oracle", "OK", 0.01)
    port = m.start_http_server(0, "127.0.0.1")
    try:
        assert port > 0
        with pytest.raises(RuntimeError):
            m.start_http_server(0, "127.0.0.1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        got = [s for s in fams["floworacle_requests"].samples if s.name == "floworacle_requests_total"]
        assert [(s.labels, s.value) for s in got] == [({"method": "Oracle", "code": "OK"}, 1.0)]
    finally:
        m.stop_http_server()
    m.stop_http_server()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    # Can be started again after a stop.
    port2 = m.start_http_server(0, "127.0.0.1")
    m.stop_http_server()
    assert port2 > 0


_CUDA_PROBE = """
import json, torch
from floworacle_server.metrics import ServiceMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

def memory(m):
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        if fam.name.startswith("floworacle_device_memory_"):
            for s in fam.samples:
                out.setdefault(s.labels["device"], {})[fam.name] = s.value
    return out

m = ServiceMetrics()
before = memory(m)
block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda:0")
after = memory(m)
print(json.dumps({"before": before, "after": after, "reserved": torch.cuda.memory_reserved(0),
                  "total": torch.cuda.get_device_properties(0).total_memory}))
"""


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_cuda_memory_is_reported_once_the_process_uses_cuda() -> None:
    import json
    import subprocess
    import sys

    # A fresh process, so that CUDA is not yet initialised when the metrics are first scraped.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _CUDA_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Before the process touched CUDA: host memory only, and no CUDA context was created for it.
    assert set(got["before"]) == {"cpu"}
    cuda = got["after"]["cuda:0"]
    assert cuda["floworacle_device_memory_total_bytes"] == got["total"]
    assert 256 * 2**20 <= cuda["floworacle_device_memory_used_bytes"] == got["reserved"] <= got["total"]
