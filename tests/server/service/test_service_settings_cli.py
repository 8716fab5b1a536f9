"""Settings precedence (flags > FLOWORACLE_* environment > YAML file > defaults), data loading
from settings, and `floworacle serve` as a real process: serves, logs, drains on SIGTERM."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.cli import build_parser
from floworacle_server.service import build_store
from floworacle_server.settings import Settings, load_settings, settings_markdown

ROOT = Path(__file__).resolve().parents[3]


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_defaults_without_environment():
    s = load_settings(None, env={})
    assert (s.host, s.port, s.metrics_port, s.device, s.dtype) == ("0.0.0.0", 50051, 9090, "auto", "float32")
    assert s.data == [] and s.max_batch_rows == 4096 and s.max_queue_delay_ms == 2.0 and s.reflection


def test_precedence_flags_over_env_over_file(tmp_path: Path):
    cfg = tmp_path / "oracle.yaml"
    cfg.write_text("port: 1111\nmetrics_port: 2222\nmax_batch_rows: 33\ndata: [a=one.npy]\n")
    env = {"FLOWORACLE_CONFIG": str(cfg), "FLOWORACLE_METRICS_PORT": "3333", "FLOWORACLE_MAX_BATCH_ROWS": "44"}
    args = build_parser().parse_args(["serve", "--max-batch-rows", "55"])
    s = load_settings(args, env=env)
    assert (s.port, s.metrics_port, s.max_batch_rows, s.data) == (1111, 3333, 55, ["a=one.npy"])
    # --config wins over FLOWORACLE_CONFIG
    other = tmp_path / "other.yaml"
    other.write_text("port: 9999\n")
    s = load_settings(build_parser().parse_args(["serve", "--config", str(other)]), env=env)
    assert s.port == 9999


def test_env_lists_and_flags_lists():
    env = {"FLOWORACLE_DATA": "a=x.npy, b=y.npy", "FLOWORACLE_LABELS": "a=ya.npy", "FLOWORACLE_REFLECTION": "false"}
    s = load_settings({}, env=env)
    assert s.data == ["a=x.npy", "b=y.npy"] and s.labels_for("a") == "ya.npy" and s.labels_for("b") is None
    assert not s.reflection
    args = build_parser().parse_args(["serve", "--data", "p.npy", "--data", "q=r.npy", "--no-reflection"])
    s = load_settings(args, env={})
    assert s.data == ["p.npy", "q=r.npy"] and not s.reflection


def test_every_setting_has_its_generated_flag_and_the_docs_table_matches():
    parser = build_parser()
    for name, info in Settings.model_fields.items():
        if isinstance(info.json_schema_extra, dict) and "env" in info.json_schema_extra:
            assert "--" + name.replace("_", "-") not in parser.format_help()  # the launcher's, no flag
            continue
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        if isinstance(default, bool):
            args = parser.parse_args(["serve", flag if not default else "--no-" + flag[2:]])
            assert getattr(args, name) is (not default), name  # (some need companions to validate)
        elif isinstance(default, int) and not isinstance(default, bool) and name != "port":
            args = parser.parse_args(["serve", flag, str(default + 1)])
            assert getattr(load_settings(args, env={}), name) == default + 1, name
    assert settings_markdown() in (ROOT / "docs" / "server.md").read_text(), "regenerate the table in docs/server.md"


def test_the_gang_placement_comes_from_the_launchers_environment():
    s = load_settings(
        {}, env={"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h0", "MASTER_PORT": "29511"}
    )
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port) == (2, 4, 0, "h0", 29511)
    with pytest.raises(ValidationError, match="outside a gang"):
        load_settings({}, env={"RANK": "4", "WORLD_SIZE": "4"})


def test_tune_allocator_flag_and_environment():
    assert load_settings(None, env={}).tune_allocator
    assert not load_settings({}, env={"FLOWORACLE_TUNE_ALLOCATOR": "false"}).tune_allocator
    args = build_parser().parse_args(["serve", "--no-tune-allocator"])
    assert not load_settings(args, env={"FLOWORACLE_TUNE_ALLOCATOR": "true"}).tune_allocator


@pytest.mark.parametrize(
    "values, text",
    [
        ({"device": "gpu"}, "device"),
        ({"port": 70000}, "port"),
        ({"dtype": "int8"}, "dtype"),
        ({"data": ["a=x.npy", "a=y.npy"]}, "given twice"),
        ({"data": ["a.npy", "b.npy"], "labels": ["l.npy"]}, "exactly one data set"),
        # a --labels name that names no data set (a typo) would serve that set without classes
        ({"data": ["imagenet=/d"], "labels": ["imagnet=/l.npy"]}, "'imagnet', which no data argument gives"),
        ({"data": ["/data/cifar.npy"], "labels": ["cifar10=/l.npy"]}, "the data sets are 'cifar'"),
        ({"labels": ["mnist=/l.npy"]}, "the data sets are 'digits'"),
        ({"data": ["a=x", "b=y"], "labels": ["a=l.npy", "a=m.npy"]}, "labels are given twice"),
        ({"health_port": 50051}, "is the gRPC port"),
        ({"max_batch_rows": 0}, "max_batch_rows"),
    ],
)
def test_invalid_settings_name_the_field(values, text):
    with pytest.raises(ValidationError, match=text):
        load_settings(values, env={})


def test_missing_or_bad_config_file(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        load_settings({"config": str(tmp_path / "nope.yaml")}, env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_settings({}, env={"FLOWORACLE_CONFIG": str(bad)})


def test_direct_construction_ignores_environment(monkeypatch):
    monkeypatch.setenv("FLOWORACLE_PORT", "1234")
    assert Settings().port == 50051
    assert load_settings({}).port == 1234  # load_settings reads os.environ when env is None


def test_a_cuda_device_that_torch_cannot_reach_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings(device="auto").resolved_device() == "cpu"
    with pytest.raises(ValueError, match=r"device 'cuda'.*use --device cpu or auto"):
        Settings(device="cuda").resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Settings(device="cuda:1").resolved_device() == "cuda:1"
    with pytest.raises(ValueError, match=r"sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        Settings(device="cuda:2").resolved_device()


@pytest.mark.skipif(torch_has_cuda(), reason="checks the error of a CPU-only torch")
def test_serve_on_cuda_with_a_cpu_torch_exits_with_the_reason():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [
        sys.executable,
        "-m",
        "floworacle_server.cli",
        "serve",
        "--device",
        "cuda",
        "--port",
        "0",
        "--metrics-port",
        "-1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "device 'cuda'" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_build_store_from_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "pts.npy", rng.standard_normal((20, 3, 2)).astype(np.float32))
    np.save(tmp_path / "lab.npy", rng.integers(0, 4, size=20))
    s = Settings(data=[str(tmp_path / "pts.npy"), "d=digits"], labels=[f"pts={tmp_path / 'lab.npy'}"], device="cpu")
    store = build_store(s)
    assert store.names() == ["pts", "d"] and store.default_name == "pts"
    assert store.get("pts").sample_shape == (3, 2) and store.get("pts").num_classes == 4
    assert store.get("d").num_samples == 1797
    digits_only = build_store(Settings())
    assert digits_only.names() == ["digits"] and str(digits_only.get("").device) == "cpu"
    # the embedded set's settings are read like any other's: its labels file is refused, not ignored
    with pytest.raises(ValueError, match="the embedded digits data set takes no labels"):
        build_store(Settings(labels=[f"digits={tmp_path / 'lab.npy'}"]))
    assert build_store(Settings(name="mine")).names() == ["mine"]
    with pytest.raises(ValueError, match="not found"):
        build_store(Settings(data=[str(tmp_path / "missing.npy")], device="cpu"))


def test_serve_command_logs_serves_and_drains_on_sigterm(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "floworacle_server.cli",
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        port = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        log = "".join(lines)
        assert "digits (default): 1797 x [64] float32 on cpu, sha256:" in log
        pinned = "yes" if platform.libc_ver()[0] == "glibc" else "no (not glibc)"
        assert f"allocator thresholds pinned: {pinned}" in log
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            names = [
                d.name for d in pb_grpc.FlowOracleStub(ch).ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets
            ]
        assert names == ["digits"]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
