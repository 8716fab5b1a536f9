"""Every validation error maps to its precise status code with an actionable message, and the
server keeps answering correctly afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
X = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
T2 = np.array([0.4, 0.6])


def _req(**fields: object) -> pb.OracleRequest:
    return oracle_request(X, T2, **fields)  # type: ignore[arg-type]


def _with(req: pb.OracleRequest, field: str, tensor: pb.Tensor) -> pb.OracleRequest:
    getattr(req, field).CopyFrom(tensor)
    return req


def _custom(**over: np.ndarray) -> pb.PathSpec:
    vals = dict(zip(("alpha", "sigma", "d_alpha", "d_sigma"), linear_coeffs(T2), strict=True))
    vals.update(over)
    return pb.PathSpec(custom=pb.CustomCoefficients(**{k: protocol.encode(v) for k, v in vals.items()}))


NO_LABELS_X = np.zeros((2, 8), np.float32)

CASES = [
    ("unknown data set", lambda: _req(dataset="nope"), grpc.StatusCode.NOT_FOUND, "digits"),
    ("fingerprint pin", lambda: _req(fingerprint="sha256:00"), grpc.StatusCode.FAILED_PRECONDITION, "sha256:00"),
    ("x_t missing", lambda: pb.OracleRequest(t=protocol.encode(T2)), INVALID, "x_t is required"),
    (
        "x_t bytes",
        lambda: _with(_req(), "x_t", pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 64], data=b"\0" * 12)),
        INVALID,
        "bytes do not match",
    ),
    ("x_t dtype", lambda: oracle_request(X.astype(np.int64), T2), INVALID, "must be float32"),
    ("x_t dtype unknown", lambda: _with(_req(), "x_t", pb.Tensor(dtype=17, shape=[0])), INVALID, "not supported"),
    ("x_t shape", lambda: oracle_request(X[:, :63], T2), INVALID, "expects (B, 64)"),
    ("x_t one-dimensional", lambda: oracle_request(X[0], T2[:1]), INVALID, "batch dimension"),
    ("x_t NaN", lambda: oracle_request(np.where(np.eye(2, 64) > 0, np.nan, X), T2), INVALID, "x_t[0] has a NaN"),
    ("t missing", lambda: oracle_request(X, None), INVALID, "t is required"),
    ("t shape", lambda: oracle_request(X, np.array([0.5])), INVALID, "shape (2,)"),
    ("t out of domain", lambda: oracle_request(X, np.array([0.5, 1.0])), INVALID, "outside [0"),
    ("t negative", lambda: oracle_request(X, np.array([-0.1, 0.5])), INVALID, "outside [0"),
    ("t NaN", lambda: oracle_request(X, np.array([np.nan, 0.5])), INVALID, "not finite"),
    ("t int", lambda: _with(_req(), "t", protocol.encode(np.array([0, 1]))), INVALID, "t must be float"),
    ("unknown path", lambda: _req(path=pb.PathSpec(named=pb.NamedPath(name="vp"))), INVALID, "unknown path"),
    (
        "bad sigma_min",
        lambda: _req(path=pb.PathSpec(named=pb.NamedPath(name="linear", sigma_min=1.5))),
        INVALID,
        "sigma_min",
    ),
    (
        "custom sigma zero",
        lambda: oracle_request(X, None, path=_custom(sigma=np.array([0.5, 0.0]))),
        INVALID,
        "below the floor",
    ),
    (
        "custom shape",
        lambda: oracle_request(X, None, path=_custom(alpha=np.array([0.5]))),
        INVALID,
        "path.custom.alpha",
    ),
    (
        "custom missing",
        lambda: oracle_request(X, None, path=pb.PathSpec(custom=pb.CustomCoefficients(alpha=protocol.encode(T2)))),
        INVALID,
        "missing",
    ),
    ("labels dtype", lambda: _with(_req(), "labels", protocol.encode(np.array([1.0, 2.0]))), INVALID, "int64"),
    ("labels shape", lambda: _with(_req(), "labels", protocol.encode(np.array([1]))), INVALID, "shape (2,)"),
    ("labels range", lambda: _with(_req(), "labels", protocol.encode(np.array([1, 10]))), INVALID, "labels[1] = 10"),
    ("labels below -1", lambda: _with(_req(), "labels", protocol.encode(np.array([-2, 1]))), INVALID, "labels[0] = -2"),
    (
        "labels on unlabelled data",
        lambda: _with(oracle_request(NO_LABELS_X, T2, dataset="plain"), "labels", protocol.encode(np.array([0, 0]))),
        INVALID,
        "has no labels",
    ),
    ("guidance without labels", lambda: _req(guidance=pb.Guidance(scale=2.0)), INVALID, "guidance needs labels"),
    (
        "guidance interval",
        lambda: _with(
            _req(guidance=pb.Guidance(scale=2.0, t_lo=0.7, t_hi=0.2)), "labels", protocol.encode(np.array([1, 2]))
        ),
        INVALID,
        "t_lo <= t_hi",
    ),
    (
        "guidance without t",
        lambda: _with(
            oracle_request(X, None, path=_custom(), guidance=pb.Guidance(scale=2.0)),
            "labels",
            protocol.encode(np.array([1, 2])),
        ),
        INVALID,
        "guidance needs t",
    ),
    ("topk without k", lambda: _req(outputs=(pb.OUTPUT_TOPK,)), INVALID, "top_k in 1..1024"),
    ("topk too large", lambda: _req(top_k=2000), INVALID, "top_k in 1..1024"),
    (
        "topk over N",
        lambda: oracle_request(NO_LABELS_X, T2, dataset="plain", top_k=31),
        INVALID,
        "top_k = 31 is more than the data set's 30",
    ),
    ("unknown output", lambda: _req(outputs=(99,)), INVALID, "unknown output"),
    ("unspecified output", lambda: _req(outputs=(pb.OUTPUT_UNSPECIFIED,)), INVALID, "unknown output"),
    ("output dtype int", lambda: _req(output_dtype=pb.DTYPE_INT64), INVALID, "output_dtype"),
    ("precision unknown", lambda: _req(precision=7), INVALID, "precision"),
    (
        "too many rows",
        lambda: oracle_request(np.zeros((301, 64), np.float32), np.full(301, 0.5)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 300",
    ),
]


@pytest.mark.parametrize("make, code, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_oracle_errors(stub, digits, make, code, text):
    with pytest.raises(grpc.RpcError) as info:
        stub.Oracle(make(), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    # the server keeps answering correctly
    x, _ = digits
    t = np.array([0.5])
    xt = noisy_queries(x, t, seed=2)
    v = protocol.decode(stub.Oracle(oracle_request(xt, t, dtype="float64"), timeout=10).velocity)
    assert max_rel(v, ref_oracle(x, xt, *linear_coeffs(t))["velocity"]) < 1e-6


NEAREST_CASES = [
    ("k zero", pb.NearestRequest(x=protocol.encode(X), k=0), INVALID, "k must lie in 1..1024"),
    ("k too large", pb.NearestRequest(x=protocol.encode(X), k=1025), INVALID, "k must lie in 1..1024"),
    (
        "k over N",
        pb.NearestRequest(dataset="plain", x=protocol.encode(NO_LABELS_X), k=31),
        INVALID,
        "k = 31 is more than",
    ),
    ("x missing", pb.NearestRequest(k=1), INVALID, "x is required"),
    ("x shape", pb.NearestRequest(x=protocol.encode(X[:, :10]), k=1), INVALID, "expects (B, 64)"),
    (
        "posterior at t=0",
        pb.NearestRequest(x=protocol.encode(X), k=1, t=protocol.encode(np.array([0.0, 0.5]))),
        INVALID,
        "t > 0",
    ),
    (
        "t out of domain",
        pb.NearestRequest(x=protocol.encode(X), k=1, t=protocol.encode(np.array([2.0, 0.5]))),
        INVALID,
        "outside",
    ),
    (
        "unknown data set",
        pb.NearestRequest(dataset="zz", x=protocol.encode(X), k=1),
        grpc.StatusCode.NOT_FOUND,
        "available",
    ),
    (
        "fingerprint pin",
        pb.NearestRequest(x=protocol.encode(X), k=1, fingerprint="sha256:ab"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "sha256:ab",
    ),
]


@pytest.mark.parametrize("req, code, text", [c[1:] for c in NEAREST_CASES], ids=[c[0] for c in NEAREST_CASES])
def test_nearest_errors(stub, req, code, text):
    with pytest.raises(grpc.RpcError) as info:
        stub.Nearest(req, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()


def test_describe_unknown_lists_names(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.DescribeDataset(pb.DescribeDatasetRequest(name="cifar"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "digits" in info.value.details() and "shaped" in info.value.details()


def test_expired_deadline_is_deadline_exceeded(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Oracle(_req(), timeout=1e-6)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_values_too_large_for_screening_are_refused_and_the_server_keeps_answering(stub, digits):
    """Finite float32 queries near float32's maximum would overflow the screening GEMM: the answer
    is INVALID_ARGUMENT naming the row, never NaN, and the next request is answered exactly."""
    x, _ = digits
    huge = np.full((2, 64), 3e38, dtype=np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.Oracle(oracle_request(huge, np.array([0.5, 0.5])), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large" in info.value.details()
    t = np.array([0.3, 0.8])
    xt = noisy_queries(x, t, seed=41)
    resp = stub.Oracle(oracle_request(xt, t, dtype="float64"), timeout=30)
    assert max_rel(protocol.decode(resp.velocity), ref_oracle(x, xt, *linear_coeffs(t))["velocity"]) < 1e-6


def test_no_answer_carries_an_infinity_and_batch_mates_are_exact(server, digits):
    """An answer that does not fit its wire dtype (a float16 velocity past 65504, a float32 one
    guided with a scale of 1e308) or overflows float64 (d_sigma = 1e308) is refused with the
    reason; a request merged with them in one engine call gets its exact answer (the async
    client sends them together)."""
    import asyncio

    from floworacle import AsyncOracleClient, OracleError

    x, labels = digits
    big = np.full((1, 64), 6e4, np.float16)  # the velocity is about -1.2e5 at t = 0.5

    async def run() -> tuple[object, object, object, object]:
        async with AsyncOracleClient(server.address, timeout=30) as c:
            calls = [
                c.velocity(big, 0.5),
                c.velocity(x[:2], 0.5, labels=labels[:2], guidance=1e308),
                c.velocity(x[:2], None, coefficients={"alpha": 0.5, "sigma": 0.5, "d_alpha": 1.0, "d_sigma": 1e308}),
                c.velocity(x[:3] * 0.5, np.array([0.3, 0.5, 0.7])),
            ]
            return tuple(await asyncio.gather(*calls, return_exceptions=True))  # type: ignore[return-value]

    half, guided, overflow, fine = asyncio.run(run())
    assert isinstance(half, OracleError) and half.code == INVALID
    assert "velocity of query 0 reaches 1.2e+05, beyond the range of float16" in half.details
    assert "float32" in half.details
    assert isinstance(guided, OracleError) and guided.code == INVALID
    assert "beyond the range of float32: ask for the answers in float64" in guided.details
    assert isinstance(overflow, OracleError) and overflow.code == INVALID and "not finite" in overflow.details
    t = np.array([0.3, 0.5, 0.7])
    ref = ref_oracle(x, x[:3] * 0.5, *linear_coeffs(t))
    assert max_rel(np.asarray(fine), ref["velocity"]) < 1e-6


@pytest.mark.parametrize("screen", ["torch", "faiss"])
def test_nearest_on_huge_finite_points_stays_finite_on_both_screens(digits, screen):
    """Points of 1e19..1e38 overflow a float32 screen (faiss returned no candidates: INTERNAL
    before); they are screened in float64 and answered with finite distances. At 1e200 the
    distances themselves overflow float64: refused, with the reason, and the server goes on."""
    from floworacle import OracleClient, OracleError
    from floworacle_server.data import BackendChoice, DatasetStore, load_digits
    from floworacle_server.service.testing import serve_in_thread
    from floworacle_server.settings import Settings

    ds = load_digits("cpu")
    ds.nearest_backends["data"] = BackendChoice(screen, "set by the test")
    x, _ = digits
    with serve_in_thread(Settings(device="cpu", metrics_port=-1), DatasetStore([ds])) as srv:
        with OracleClient(srv.address, timeout=60) as c:
            for v in (1e19, 1e30, 1e38):
                pts = np.vstack([np.full((1, 64), v), x[5:6].astype(np.float64)])
                nn = c.nearest(pts, k=3)
                assert np.isfinite(nn.distances).all() and (nn.indices >= 0).all()
                assert nn.indices[1, 0] == 5 and nn.distances[1, 0] == 0.0  # the ordinary row is exact
                # what a float64 brute force over the stored values gives (ties by index)
                d = np.sqrt(((pts[0] - x.astype(np.float64)) ** 2).sum(axis=1))
                np.testing.assert_array_equal(nn.distances[0], d[nn.indices[0]])
                assert nn.distances[0, -1] <= np.sort(d)[2]
            with pytest.raises(OracleError) as err:
                c.nearest(np.full((2, 64), 1e200), k=2)
            assert err.value.code == INVALID and "distances of query 0 is not finite" in err.value.details
            assert c.nearest(x[:2], k=1).indices[:, 0].tolist() == [0, 1]


def test_data_with_a_huge_finite_sample_serves_on_both_screens():
    """A data set holding a sample of 1e19 (``index build`` accepts it) used to stop ``serve``
    with an IndexError in the start-up calibration of the faiss screen: the calibration now
    (which runs both screens) finishes, both answer exactly, and the oracle gives the huge sample no weight."""
    from floworacle import OracleClient
    from floworacle_server.data import BackendChoice, Dataset, DatasetStore
    from floworacle_server.engine import calibrate_nearest_backends
    from floworacle_server.service.testing import serve_in_thread
    from floworacle_server.settings import Settings

    x = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    x[5] = 1e19  # its squared norm, 8e38, overflows float32
    assert set(calibrate_nearest_backends(Dataset.from_arrays("huge", x), force=True)) == {"data"}
    xt = x[:3] * 0.5
    ref = ref_oracle(x, xt, *linear_coeffs(np.full(3, 0.5)))
    for screen in ("torch", "faiss"):
        ds = Dataset.from_arrays("huge", x)
        ds.nearest_backends["data"] = BackendChoice(screen, "set by the test")
        with serve_in_thread(Settings(device="cpu", metrics_port=-1), DatasetStore([ds])) as srv:
            with OracleClient(srv.address, timeout=60) as c:
                nn = c.nearest(x[[0, 5, 7]], k=1)
                assert nn.indices[:, 0].tolist() == [0, 5, 7] and (nn.distances == 0).all()
                assert max_rel(np.asarray(c.velocity(xt, 0.5)), ref["velocity"]) < 1e-6


def test_huge_queries_are_refused_for_what_they_are(stub):
    """x_t of 1e19..3e38 (finite float32) or alpha = 1e20 used to be told to "drop the exclusion"
    they never sent: the message now names the query, its magnitude and what to change."""
    for v in (1e19, 1e30, 3e38):
        x = np.full((2, 64), v, np.float32)
        x[1] = 0.1
        with pytest.raises(grpc.RpcError) as err:
            stub.Oracle(oracle_request(x, T2), timeout=30)
        assert err.value.code() == INVALID
        assert "x_t[0] is too large for the oracle's logits" in err.value.details()
        assert "exclusion" not in err.value.details()
    huge_alpha = _custom(alpha=np.array([1e20, 0.4]))
    with pytest.raises(grpc.RpcError) as err:
        stub.Oracle(_req(path=huge_alpha), timeout=30)
    assert err.value.code() == INVALID and "alpha = 1e+20" in err.value.details()


def test_long_names_and_pins_are_not_echoed_whole(stub):
    """A 100 kB data set name or fingerprint pin is quoted in part: the status keeps its code
    (echoed whole it passed gRPC's metadata limit and became RESOURCE_EXHAUSTED)."""
    long = "x" * 100_000
    with pytest.raises(grpc.RpcError) as err:
        stub.Oracle(_req(dataset=long), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(100000 characters)" in err.value.details() and len(err.value.details()) < 1000
    with pytest.raises(grpc.RpcError) as err:
        stub.Oracle(_req(fingerprint="sha256:" + long), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(100007 characters)" in err.value.details() and len(err.value.details()) < 1000
