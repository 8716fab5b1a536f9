"""A client nobody on the team wrote: Node.js with the standard gRPC stack (@grpc/grpc-js and
@grpc/proto-loader as npm resolves them today, no overrides), made from proto/ alone, calls a live
server: ListDatasets, Oracle with every output and the local and linear kinds, OracleStream,
Nearest, health and reflection. Its
answers must parse and carry the same bytes as the Python SDK's for the same requests.

npm installs the packages into tests/foreign/node/node_modules on first use. Without node and npm
the test is skipped with the reason, except in CI (``CI`` set), where it fails: .ci/run installs
Debian's nodejs and npm.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from floworacle import OracleClient
from floworacle.protocol import OUTPUTS, encode, pb
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = Path(__file__).resolve().parent / "node"
PROTO = ROOT / "proto" / "floworacle" / "v1" / "oracle.proto"
SHAPE = (2, 4, 4)
D = int(np.prod(SHAPE))


def _node_ready() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{' and '.join(missing)} missing in CI: .ci/run installs Debian's nodejs and npm")
        pytest.skip(f"{' and '.join(missing)} not installed: the foreign-client test needs Node.js (CI runs it)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, *SHAPE)).astype(np.float32)
    store = DatasetStore([Dataset.from_arrays("blobs", x, labels=np.arange(60) % 3, sample_shape=SHAPE)])
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=0.0), store) as srv:
        yield srv


def _tensor(a: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    t = encode(a, dtype)
    return {
        "dtype": pb.DType.Name(t.dtype),
        "shape": [str(s) for s in t.shape],
        "data": base64.b64encode(t.data).decode(),
    }


def _bytes(t: dict[str, Any] | None) -> bytes:
    assert t is not None
    return base64.b64decode(t["data"])


def _run_node(address: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    plan = json.dumps({"address": address, "proto": str(PROTO), "calls": calls})
    out = subprocess.run(
        ["node", "client.mjs"], cwd=NODE_DIR, input=plan, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_node_client_reads_every_answer_with_the_sdks_bytes(server: RunningServer) -> None:
    _node_ready()
    rng = np.random.default_rng(4)
    all_outputs = [pb.Output.Name(o.enum) for o in OUTPUTS]
    cases = []
    for b in (1, 16, 64):
        x_t = rng.standard_normal((b, *SHAPE)).astype(np.float32)
        t = np.linspace(0.05, 0.95, b)
        labels = (np.arange(b) % 4 - 1).astype(np.int64)
        cases.append((x_t, t, labels))
    calls: list[dict[str, Any]] = [{"method": "ListDatasets"}]
    for x_t, t, labels in cases:
        req = {"x_t": _tensor(x_t), "t": _tensor(t), "outputs": all_outputs, "top_k": 3}
        calls.append({"method": "Oracle", "request": req})
        calls.append({"method": "Oracle", "request": {**req, "labels": _tensor(labels), "precision": "PRECISION_FAST"}})
        calls.append({"method": "Nearest", "request": {"x": _tensor(x_t.reshape(len(x_t), D)), "k": 5}})
        kinds = {"x_t": _tensor(x_t), "t": _tensor(t), "outputs": ["OUTPUT_VELOCITY", "OUTPUT_X1_HAT"]}
        patch = np.full(len(x_t), 3, dtype=np.int64)
        calls.append({"method": "Oracle", "request": {**kinds, "kind": "KIND_LOCAL", "patch_size": _tensor(patch)}})
        calls.append({"method": "Oracle", "request": {**kinds, "kind": "KIND_LINEAR"}})
    stream_reqs = [
        {"x_t": _tensor(x_t), "t": _tensor(t), "outputs": ["OUTPUT_VELOCITY"], "request_id": f"r{i}"}
        for i, (x_t, t, _) in enumerate(cases)
    ]
    calls.append({"kind": "stream", "requests": stream_reqs})
    calls.append({"kind": "health", "service": ""})
    calls.append({"kind": "health", "service": "floworacle.v1.FlowOracle/blobs"})
    calls.append({"kind": "reflection"})
    got = _run_node(server.address, calls)
    results = got["results"]
    assert all("error" not in r for r in results), [r for r in results if "error" in r]

    with OracleClient(server.address) as sdk:
        info = results[0]["ok"]["datasets"][0]
        assert info["name"] == "blobs" and info["fingerprint"] == sdk.describe().fingerprint
        assert info["sample_shape"] == [str(s) for s in SHAPE] and info["num_samples"] == "60"
        k = 1
        for x_t, t, labels in cases:
            b = len(x_t)
            plain, labelled, near = results[k]["ok"], results[k + 1]["ok"], results[k + 2]["ok"]
            local, linear = results[k + 3]["ok"], results[k + 4]["ok"]
            k += 5
            for answer, options in ((local, {"kind": "local", "patch_size": 3}), (linear, {"kind": "linear"})):
                r = sdk.predict(x_t, t, outputs=("velocity", "x1_hat"), **options)  # type: ignore[arg-type]
                assert _bytes(answer["velocity"]) == r.velocity.tobytes(), options
                assert _bytes(answer["x1_hat"]) == r.x1_hat.tobytes(), options
                assert _bytes(answer["x1_hat_error_bound"]) == r.x1_hat_error_bound.tobytes(), options
            p = sdk.predict(x_t, t, outputs=[o.name for o in OUTPUTS], top_k=3)
            for o in OUTPUTS:
                for name in o.fields:
                    assert plain[name]["shape"] == [str(s) for s in np.shape(getattr(p, name))], name
                    assert _bytes(plain[name]) == np.ascontiguousarray(getattr(p, name)).tobytes(), (b, name)
            q = sdk.predict(x_t, t, outputs=("velocity", "topk"), labels=labels, precision="fast", top_k=3)
            assert labelled["precision"] == "PRECISION_FAST"
            assert _bytes(labelled["velocity"]) == q.velocity.tobytes()
            assert _bytes(labelled["topk_indices"]) == q.topk_indices.tobytes()
            nn = sdk.nearest(x_t.reshape(b, D), k=5)
            assert near["indices"]["shape"] == [str(b), "5"]
            assert _bytes(near["indices"]) == nn.indices.tobytes() and _bytes(near["labels"]) == nn.labels.tobytes()
            assert _bytes(near["distances"]) == nn.distances.tobytes()
        stream = results[k]["ok"]
        assert [m["request_id"] for m in stream] == ["r0", "r1", "r2"]
        for m, (x_t, t, _) in zip(stream, cases, strict=True):
            assert int(m.get("error_code") or 0) == 0
            assert _bytes(m["response"]["velocity"]) == sdk.velocity(x_t, t).tobytes()
    assert results[k + 1]["ok"]["status"] == "SERVING" and results[k + 2]["ok"]["status"] == "SERVING"
    refl = results[k + 3]
    assert "floworacle.v1.FlowOracle" in refl["services"] and refl["descriptors"] > 0, refl
    major = int(got["versions"]["protobufjs"].split(".")[0])
    assert major >= 7, got["versions"]  # the stack as npm resolves it today (protobufjs 7 broke the old framing)
