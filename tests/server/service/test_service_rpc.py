"""Every RPC over a real channel, checked against an independent float64 reference."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_nearest, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb

T = np.array([0.0, 0.2, 0.5, 0.8, 0.95, 0.999])
ALL_OUTPUTS = (
    pb.OUTPUT_VELOCITY,
    pb.OUTPUT_X1_HAT,
    pb.OUTPUT_EPS_HAT,
    pb.OUTPUT_SCORE,
    pb.OUTPUT_TOPK,
    pb.OUTPUT_ENTROPY,
    pb.OUTPUT_ESS,
)
# Relative error allowed per wire dtype: float64 carries the engine's ~1e-5 guarantee (we ask
# far less than float32 rounding there), the others their own rounding.
WIRE_TOL = {"float64": 1e-6, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1e-2}


def test_list_and_describe(stub, digits):
    resp = stub.ListDatasets(pb.ListDatasetsRequest())
    by_name = {d.name: d for d in resp.datasets}
    assert list(by_name) == ["digits", "shaped", "plain"]
    d = by_name["digits"]
    assert (d.num_samples, d.dim, list(d.sample_shape), d.num_classes) == (1797, 64, [64], 10)
    assert d.is_default and not by_name["shaped"].is_default
    assert d.storage_dtype == pb.DTYPE_FLOAT32 and d.device == "cpu" and d.fingerprint.startswith("sha256:")
    assert list(by_name["shaped"].sample_shape) == [2, 4, 4] and by_name["plain"].num_classes == 0
    one = stub.DescribeDataset(pb.DescribeDatasetRequest(name="shaped"))
    assert one == by_name["shaped"]
    assert stub.DescribeDataset(pb.DescribeDatasetRequest()) == d  # empty name: the default


def test_oracle_all_outputs_match_reference(stub, digits):
    x, _ = digits
    xt = noisy_queries(x, T).astype(np.float32)
    resp = stub.Oracle(oracle_request(xt, T, outputs=ALL_OUTPUTS, top_k=5, request_id="r1"))
    ref = ref_oracle(x, xt, *linear_coeffs(T))
    assert resp.dataset == "digits" and resp.request_id == "r1" and resp.precision == pb.PRECISION_EXACT
    for name in ("velocity", "x1_hat", "eps_hat", "score"):
        got = protocol.decode(getattr(resp, name))
        assert got.dtype == np.float32 and got.shape == xt.shape
        assert max_rel(got, ref[name]) < WIRE_TOL["float32"], name
    np.testing.assert_allclose(protocol.decode(resp.entropy), ref["entropy"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(protocol.decode(resp.ess), ref["ess"], rtol=1e-6)
    idx = protocol.decode(resp.topk_indices)
    w = protocol.decode(resp.topk_weights)
    assert idx.shape == (len(T), 5) and idx.dtype == np.int64 and w.dtype == np.float64
    for b in range(len(T)):
        valid = idx[b] >= 0  # the engine marks slots beyond the samples within reach with -1
        np.testing.assert_allclose(w[b][valid], ref["weights"][b, idx[b][valid]], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(w[b][valid], np.sort(ref["weights"][b])[::-1][: valid.sum()], rtol=1e-6, atol=1e-12)
    bound = protocol.decode(resp.x1_hat_error_bound)
    assert bound.shape == (len(T),) and (bound >= 0).all() and (bound < 1e-5).all()
    assert protocol.decode(resp.velocity_error_bound).shape == (len(T),)


def test_default_output_is_velocity_only(stub, digits):
    x, _ = digits
    xt = noisy_queries(x, T[:3]).astype(np.float32)
    resp = stub.Oracle(oracle_request(xt, T[:3]))
    assert resp.HasField("velocity") and not resp.HasField("x1_hat") and not resp.HasField("topk_indices")


@pytest.mark.parametrize("in_dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("out_dtype", [None, "float32", "float16", "bfloat16", "float64"])
def test_each_dtype_in_and_out(stub, digits, in_dtype, out_dtype):
    x, _ = digits
    t = T[1:5]
    req = oracle_request(noisy_queries(x, t, seed=3), t, dtype=in_dtype, outputs=(pb.OUTPUT_VELOCITY,))
    if out_dtype is not None:
        req.output_dtype = protocol.dtype_by_name(out_dtype).enum
    sent = protocol.decode(req.x_t)  # what the server sees, exactly (bf16 / f16 rounding included)
    resp = stub.Oracle(req)
    expect = out_dtype or in_dtype
    assert resp.velocity.dtype == protocol.dtype_by_name(expect).enum
    ref = ref_oracle(x, sent, *linear_coeffs(t))["velocity"]
    assert max_rel(protocol.decode(resp.velocity), ref) < WIRE_TOL[expect]


def test_outputs_keep_the_request_sample_shape(stub, shaped_arrays):
    data, _ = shaped_arrays
    t = np.array([0.3, 0.6, 0.9])
    flat = noisy_queries(data, t, seed=4)
    ref = ref_oracle(data, flat, *linear_coeffs(t))
    for shape in [(3, 2, 4, 4), (3, 32)]:
        resp = stub.Oracle(
            oracle_request(flat.reshape(shape), t, dataset="shaped", outputs=(pb.OUTPUT_VELOCITY, pb.OUTPUT_SCORE))
        )
        v = protocol.decode(resp.velocity)
        assert v.shape == shape and protocol.decode(resp.score).shape == shape
        assert max_rel(v.reshape(3, -1), ref["velocity"]) < 2e-6


def test_class_conditional_and_unconditional_rows(stub, digits):
    x, y = digits
    t = np.array([0.3, 0.5, 0.7, 0.9])
    xt = noisy_queries(x, t, seed=5)
    labels = np.array([3, -1, 7, 0], dtype=np.int64)
    req = oracle_request(xt, t, dtype="float64", outputs=(pb.OUTPUT_X1_HAT, pb.OUTPUT_VELOCITY))
    req.labels.CopyFrom(protocol.encode(labels))
    resp = stub.Oracle(req)
    ref = ref_oracle(x, xt, *linear_coeffs(t), data_labels=y, labels=labels)
    assert max_rel(protocol.decode(resp.x1_hat), ref["x1_hat"]) < 1e-6
    assert max_rel(protocol.decode(resp.velocity), ref["velocity"]) < 1e-6


def test_guidance_inside_and_outside_interval(stub, digits):
    x, y = digits
    t = np.array([0.2, 0.4, 0.6, 0.8])
    xt = noisy_queries(x, t, seed=6)
    labels = np.array([1, 2, 3, 4], dtype=np.int64)
    scale, lo, hi = 2.5, 0.3, 0.7
    req = oracle_request(xt, t, dtype="float64", guidance=pb.Guidance(scale=scale, t_lo=lo, t_hi=hi))
    req.labels.CopyFrom(protocol.encode(labels))
    got = protocol.decode(stub.Oracle(req).velocity)
    coeffs = linear_coeffs(t)
    u = ref_oracle(x, xt, *coeffs)["velocity"]
    u_c = ref_oracle(x, xt, *coeffs, data_labels=y, labels=labels)["velocity"]
    inside = ((t >= lo) & (t <= hi))[:, None]
    expect = np.where(inside, u + scale * (u_c - u), u_c)
    assert max_rel(got, expect) < 1e-6


def test_named_paths_and_custom_coefficients(stub, digits):
    x, _ = digits
    t = np.array([0.1, 0.5, 0.9])
    xt = noisy_queries(x, t, seed=9)
    h = np.pi / 2
    cos = (np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t))
    ref = ref_oracle(x, xt, *cos)["velocity"]
    named = stub.Oracle(oracle_request(xt, t, dtype="float64", path=pb.PathSpec(named=pb.NamedPath(name="cosine"))))
    custom = pb.PathSpec(
        custom=pb.CustomCoefficients(
            **{k: protocol.encode(v) for k, v in zip(("alpha", "sigma", "d_alpha", "d_sigma"), cos, strict=True)}
        )
    )
    without_t = stub.Oracle(oracle_request(xt, None, dtype="float64", path=custom))
    assert max_rel(protocol.decode(named.velocity), ref) < 1e-6
    assert max_rel(protocol.decode(without_t.velocity), ref) < 1e-6
    # linear with sigma_min: sigma_t = 1 - (1 - s) t, d_sigma = -(1 - s)
    s = 0.01
    lin = (t, 1 - (1 - s) * t, np.ones_like(t), np.full_like(t, -(1 - s)))
    got = stub.Oracle(
        oracle_request(xt, t, dtype="float64", path=pb.PathSpec(named=pb.NamedPath(name="linear", sigma_min=s)))
    )
    assert max_rel(protocol.decode(got.velocity), ref_oracle(x, xt, *lin)["velocity"]) < 1e-6


def test_fingerprint_pin_accepted(stub):
    info = stub.DescribeDataset(pb.DescribeDatasetRequest(name="plain"))
    xt = np.zeros((1, 8), np.float32)
    resp = stub.Oracle(oracle_request(xt, [0.5], dataset="plain", fingerprint=info.fingerprint))
    assert resp.fingerprint == info.fingerprint and resp.dataset == "plain"


def test_fast_precision_reports_bound(stub, digits):
    x, _ = digits
    t = np.array([0.5, 0.9])
    xt = noisy_queries(x, t, seed=10)
    resp = stub.Oracle(oracle_request(xt, t, dtype="float64", precision=pb.PRECISION_FAST))
    assert resp.precision == pb.PRECISION_FAST
    bound = protocol.decode(resp.velocity_error_bound)
    err = np.abs(protocol.decode(resp.velocity) - ref_oracle(x, xt, *linear_coeffs(t))["velocity"]).max(axis=1)
    assert (err <= bound + 1e-12).all()


def test_nearest_plain_and_posterior(stub, digits, shaped_arrays):
    x, y = digits
    rng = np.random.default_rng(11)
    q = rng.standard_normal((5, 64)) * 0.5
    resp = stub.Nearest(pb.NearestRequest(x=protocol.encode(q), k=4))
    idx, dist = ref_nearest(x, q, 4)
    np.testing.assert_array_equal(protocol.decode(resp.indices), idx)
    np.testing.assert_allclose(protocol.decode(resp.distances), dist, rtol=1e-9)
    np.testing.assert_array_equal(protocol.decode(resp.labels), y[idx])
    # posterior-nearest: the search runs for x_t / alpha_t
    t = np.array([0.3, 0.5, 0.7, 0.9, 0.99])
    xt = noisy_queries(x, t, seed=12)
    resp = stub.Nearest(pb.NearestRequest(x=protocol.encode(xt), k=1, t=protocol.encode(t)))
    idx, _ = ref_nearest(x, xt / t[:, None], 1)
    np.testing.assert_array_equal(protocol.decode(resp.indices), idx)
    # the top posterior weight's sample is the posterior-nearest one
    w = ref_oracle(x, xt, *linear_coeffs(t))["weights"]
    np.testing.assert_array_equal(protocol.decode(resp.indices)[:, 0], w.argmax(axis=1))
    # sample-shaped points on a data set without... labels come back only where there are labels
    data, _ = shaped_arrays
    r2 = stub.Nearest(pb.NearestRequest(dataset="shaped", x=protocol.encode(data[:2]), k=1))
    np.testing.assert_array_equal(protocol.decode(r2.indices)[:, 0], [0, 1])
    r3 = stub.Nearest(pb.NearestRequest(dataset="plain", x=protocol.encode(np.zeros((1, 8))), k=2))
    assert not r3.HasField("labels")


def test_metrics_endpoint_counts_requests(server, stub):
    stub.ListDatasets(pb.ListDatasetsRequest())
    with pytest.raises(grpc.RpcError):
        stub.DescribeDataset(pb.DescribeDatasetRequest(name="nope"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'floworacle_requests_total{code="OK",method="ListDatasets"}' in text
    assert 'floworacle_requests_total{code="NOT_FOUND",method="DescribeDataset"}' in text
    assert 'floworacle_dataset_info{dataset="shaped"' in text
