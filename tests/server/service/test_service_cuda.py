"""The server with its data on a CUDA device: merged concurrent requests stay exact and nearest
queries come back on the host (runs only where CUDA is available)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_nearest, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_server_merges_and_stays_exact():
    rng = np.random.default_rng(5)
    data = rng.standard_normal((3000, 2, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=3000)
    store = DatasetStore([Dataset.from_arrays("gpu", data, labels, sample_shape=(2, 8, 8), device="cuda")])
    settings = Settings(device="cuda", max_queue_delay_ms=200.0, metrics_port=-1)
    cases = []
    for i in range(16):
        t = rng.uniform(0.05, 0.98, size=3)
        cases.append((noisy_queries(data, t, seed=i), t, rng.integers(-1, 5, size=3) if i % 2 else None))

    def call(stub, case):
        xt, t, lab = case
        req = oracle_request(xt.reshape(3, 2, 8, 8), t, dtype="float64", outputs=(pb.OUTPUT_VELOCITY, pb.OUTPUT_ESS))
        if lab is not None:
            req.labels.CopyFrom(protocol.encode(lab))
        return stub.Oracle(req, timeout=60)

    with serve_in_thread(settings, store) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        assert stub.DescribeDataset(pb.DescribeDatasetRequest(name="gpu")).device.startswith("cuda")
        call(stub, cases[0])  # warm-up (CUDA context, kernels)
        before = srv.server.batcher.engine_calls
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda c: call(stub, c), cases))
        calls = srv.server.batcher.engine_calls - before
        q = rng.standard_normal((4, 128))
        near = stub.Nearest(pb.NearestRequest(x=protocol.encode(q), k=3), timeout=60)
    assert calls <= 4
    for (xt, t, lab), resp in zip(cases, answers, strict=True):
        ref = ref_oracle(data, xt, *linear_coeffs(t), data_labels=labels, labels=lab)
        v = protocol.decode(resp.velocity)
        assert v.shape == (3, 2, 8, 8)
        assert max_rel(v.reshape(3, -1), ref["velocity"]) < 1e-5
        np.testing.assert_allclose(protocol.decode(resp.ess), ref["ess"], rtol=1e-5)
    idx, dist = ref_nearest(data, q, 3)
    np.testing.assert_array_equal(protocol.decode(near.indices), idx)
    np.testing.assert_allclose(protocol.decode(near.distances), dist, rtol=1e-6)
    np.testing.assert_array_equal(protocol.decode(near.labels), labels[idx])
