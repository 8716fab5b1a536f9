"""Property-based fuzzing of the wire decoder and of the servicer over a real channel.

Arbitrary tensors (dtype enums, shapes, byte strings), arbitrary OracleRequest / NearestRequest
messages (dtypes, shapes, NaN/Inf, t, paths, labels, guidance, k, top_k, data set names,
fingerprints), request streams and raw random bytes must each end in an intended status
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN;
every success has the right shapes and finite values (and, where the reference applies, the exact
answer); after the fuzzing the server still answers a normal request exactly.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from service_helpers import linear_coeffs, max_rel, ref_nearest, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ALLOWED_NUMBERS = {c.value[0] for c in ALLOWED}
MAX_MESSAGE = 64 * 1024
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples every run: a deterministic test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_RNG = np.random.default_rng(123)
SMALL_X = _RNG.standard_normal((40, 4)).astype(np.float32)  # "small": D = 4, labels 0..2
SMALL_Y = np.arange(40) % 3
IMG_X = _RNG.standard_normal((24, 2, 2, 2)).astype(np.float32)  # "img": sample shape (2, 2, 2), no labels
SHAPES = {"small": (4,), "img": (2, 2, 2)}


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    store = DatasetStore()
    store.add(Dataset.from_arrays("small", SMALL_X, SMALL_Y))
    store.add(Dataset.from_arrays("img", IMG_X, sample_shape=(2, 2, 2)))
    s = Settings(device="cpu", max_queue_delay_ms=0.0, max_request_rows=64, max_message_bytes=MAX_MESSAGE)
    with serve_in_thread(s, store) as running:
        yield running


@pytest.fixture(scope="module")
def stub(srv: RunningServer) -> Iterator[pb_grpc.FlowOracleStub]:
    with grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.FlowOracleStub(ch)


@pytest.fixture(scope="module")
def raw_channel(srv: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(srv.address) as ch:
        yield ch


# -- strategies ----------------------------------------------------------------------------------

_SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e4, -1e4, 1e-30])
_FLOATS = st.floats(-20, 20, allow_nan=False) | _SPECIAL
_FLOAT_WIRE = ["float32", "float16", "bfloat16", "float64"]


def _pick(draw: st.DrawFn, wild: bool, good: list[Any], bad: list[Any]) -> Any:
    """One of ``good``, or (in a wild request) of ``good + bad``. Half of the requests are wild,
    the other half well-formed with random contents, so the fuzzing reaches the engine too."""
    return draw(st.sampled_from(good + bad if wild else good))


@st.composite
def raw_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Anything the Tensor message can hold: unknown dtypes, negative or huge dims, any bytes."""
    dims = st.integers(-2, 6) | st.integers(2**31, 2**62)
    return pb.Tensor(
        dtype=draw(st.integers(-1, 8)),  # type: ignore[arg-type]
        shape=draw(st.lists(dims, max_size=4)),
        data=draw(st.binary(max_size=96)),
    )


def _encode(values: np.ndarray, wire: str) -> pb.Tensor:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf cast to int64 on purpose
        return protocol.encode(values, wire)


@st.composite
def float_tensors(draw: st.DrawFn, shape: tuple[int, ...], wild: bool) -> pb.Tensor:
    """Tensors of ``shape`` with random values and wire dtype; wild ones may hold NaN/Inf, be
    int64, or be raw."""
    kind = _pick(draw, wild, ["good"], ["raw", "special", "int64"])
    if kind == "raw":
        return draw(raw_tensors())
    values = draw(hnp.arrays(np.float64, shape, elements=_FLOATS if kind == "special" else st.floats(-20, 20)))
    return _encode(values, "int64" if kind == "int64" else draw(st.sampled_from(_FLOAT_WIRE)))


@st.composite
def vectors(draw: st.DrawFn, b: int, lo: float, hi: float, wild: bool) -> pb.Tensor | None:
    kind = _pick(draw, wild, ["good"], ["none", "wrong_len", "raw", "special"])
    if kind == "none":
        return None
    if kind == "raw":
        return draw(raw_tensors())
    n = max(0, b if kind != "wrong_len" else b + draw(st.sampled_from([-1, 1, 2])))
    elems = st.floats(lo, hi) if kind != "special" else (st.floats(lo, hi) | _SPECIAL)
    wire = draw(st.sampled_from(_FLOAT_WIRE + (["int64"] if wild else [])))
    return _encode(np.asarray(draw(st.lists(elems, min_size=n, max_size=n)), np.float64), wire)


@st.composite
def paths(draw: st.DrawFn, b: int, wild: bool) -> pb.PathSpec | None:
    kind = _pick(draw, wild, ["none", "none", "named"], ["custom"])
    if kind == "none":
        return None
    if kind == "named":
        return pb.PathSpec(
            named=pb.NamedPath(
                name=_pick(draw, wild, ["linear", "cosine"], ["vp", "ve", "bogus", ""]),
                sigma_min=_pick(draw, wild, [0.0, 1e-3], [0.5, -1.0, math.nan, 2.0]),
            )
        )
    fields = {}
    for f in ("alpha", "sigma", "d_alpha", "d_sigma"):
        v = draw(vectors(b, -2.0, 2.0, wild))
        if v is not None:
            fields[f] = v
    return pb.PathSpec(custom=pb.CustomCoefficients(**fields))


def _dataset_and_shape(draw: st.DrawFn, wild: bool) -> tuple[str, tuple[int, ...], int]:
    name = _pick(draw, wild, ["", "small", "img"], ["missing", "Small", "img "])
    sample = SHAPES.get(name or "small", (4,))
    d = int(np.prod(sample))
    b = draw(st.integers(1, 5) if not wild else st.integers(0, 5))
    shape = _pick(draw, wild, [(b, d), (b, *sample)], [(b,), (b, d + 1), (b, 1, d), (b, d, 1)])
    return name, shape, b


def _fingerprint(draw: st.DrawFn, fps: dict[str, str], name: str, wild: bool) -> str:
    return _pick(draw, wild, ["", fps.get(name or "small", "")], ["sha256:" + "0" * 64, "garbage"])


@st.composite
def oracle_requests(draw: st.DrawFn, fps: dict[str, str]) -> pb.OracleRequest:
    wild = draw(st.booleans())
    name, shape, b = _dataset_and_shape(draw, wild)
    req = pb.OracleRequest(
        dataset=name, fingerprint=_fingerprint(draw, fps, name, wild), request_id=draw(st.text(max_size=6))
    )
    req.x_t.CopyFrom(draw(float_tensors(shape, wild)))
    t = draw(vectors(b, 0.0, 0.99, wild) if not wild else vectors(b, -0.2, 1.2, wild))
    if t is not None:
        req.t.CopyFrom(t)
    path = draw(paths(b, wild))
    if path is not None:
        req.path.CopyFrom(path)
    outputs = st.integers(1, 7) if not wild else st.integers(-1, 9)
    req.outputs.extend(draw(st.lists(outputs, max_size=4)))  # type: ignore[arg-type]
    labelled = (name or "small") == "small"
    labels = _pick(draw, wild, ["none", "good"] if labelled else ["none"], ["good", "bad", "raw"])
    if labels == "good":
        values = draw(st.lists(st.integers(-1, 2) if not wild else st.integers(-2, 4), min_size=b, max_size=b))
        req.labels.CopyFrom(protocol.encode(np.asarray(values, np.int64)))
    elif labels == "bad":
        req.labels.CopyFrom(draw(float_tensors((b,), True)))
    elif labels == "raw":
        req.labels.CopyFrom(draw(raw_tensors()))
    if labels == "good" and draw(st.booleans()):
        g = st.floats(-1, 3) if not wild else st.floats(-1, 3) | _SPECIAL
        lo, hi = sorted((draw(st.floats(0, 1)), draw(st.floats(0, 1))))
        req.guidance.CopyFrom(
            pb.Guidance(scale=draw(g), t_lo=lo if not wild else draw(g), t_hi=hi if not wild else draw(g))
        )
    req.top_k = _pick(draw, wild, [0, 1, 2, 3, 24], [40, 41, 1024, 1025, 2**32 - 1])
    req.precision = _pick(draw, wild, [0, 1, 2], [-1, 3])  # type: ignore[assignment]
    req.output_dtype = _pick(draw, wild, [0, 1, 2, 3, 4], [-1, 5, 6])  # type: ignore[assignment]
    return req


@st.composite
def nearest_requests(draw: st.DrawFn, fps: dict[str, str]) -> pb.NearestRequest:
    wild = draw(st.booleans())
    name, shape, b = _dataset_and_shape(draw, wild)
    req = pb.NearestRequest(dataset=name, fingerprint=_fingerprint(draw, fps, name, wild))
    req.x.CopyFrom(draw(float_tensors(shape, wild)))
    req.k = _pick(draw, wild, [1, 2, 5, 24], [0, 25, 40, 41, 1024, 1025, 2**32 - 1])
    if draw(st.integers(0, 3)) == 0:  # posterior-nearest at time t
        t = draw(vectors(b, 0.05, 0.99, wild) if not wild else vectors(b, -0.2, 1.2, wild))
        if t is not None:
            req.t.CopyFrom(t)
        path = draw(paths(b, wild))
        if path is not None:
            req.path.CopyFrom(path)
    return req


# -- checks --------------------------------------------------------------------------------------

_VECTOR_FIELDS = ("velocity", "x1_hat", "eps_hat", "score")


def _finite(a: np.ndarray, wire: int) -> bool:
    if wire == pb.DTYPE_FLOAT16:  # a large but finite float32 answer may overflow float16 to +-inf
        return not np.isnan(a).any()
    return bool(np.isfinite(a).all())


def _check_oracle_success(req: pb.OracleRequest, resp: pb.OracleResponse) -> None:
    x = protocol.decode(req.x_t)
    b = x.shape[0]
    present = [f for f in _VECTOR_FIELDS if resp.HasField(f)]
    assert present or resp.HasField("topk_indices") or resp.HasField("entropy") or resp.HasField("ess")
    for f in present:
        t = getattr(resp, f)
        a = protocol.decode(t)
        assert a.shape == x.shape, (f, a.shape, x.shape)
        assert _finite(a, t.dtype), (f, a)
    if resp.HasField("topk_indices"):
        idx, w = protocol.decode(resp.topk_indices), protocol.decode(resp.topk_weights)
        n = len(SMALL_X) if resp.dataset == "small" else len(IMG_X)
        assert idx.shape == w.shape and idx.shape[0] == b and 1 <= idx.shape[1] <= n
        assert ((idx >= -1) & (idx < n)).all() and np.isfinite(w).all() and (w >= 0).all()
        assert (w.sum(axis=1) <= 1 + 1e-9).all()
    for f in ("entropy", "ess", "x1_hat_error_bound", "velocity_error_bound"):
        if resp.HasField(f):
            a = protocol.decode(getattr(resp, f))
            assert a.shape == (b,) and np.isfinite(a).all(), f
    # exact answer where the float64 reference applies: linear path, exact precision, no guidance
    linear = not req.HasField("path") or (
        req.path.WhichOneof("kind") == "named" and req.path.named.name == "linear" and req.path.named.sigma_min == 0
    )
    if "velocity" in present and linear and not req.HasField("guidance") and req.precision in (0, 1) and b:
        data, dlab = (SMALL_X, SMALL_Y) if resp.dataset == "small" else (IMG_X, None)
        tv = protocol.decode(req.t).astype(np.float64)
        labels = protocol.decode(req.labels) if req.HasField("labels") else None
        ref = ref_oracle(data, x.astype(np.float64), *linear_coeffs(tv), data_labels=dlab, labels=labels)["velocity"]
        tol = {pb.DTYPE_FLOAT16: 2e-3, pb.DTYPE_BFLOAT16: 1e-2}.get(resp.velocity.dtype, 2e-5)
        assert max_rel(protocol.decode(resp.velocity).reshape(b, -1), ref) <= tol
        OUTCOMES["Oracle:exact"] += 1


def _check_nearest_success(req: pb.NearestRequest, resp: pb.NearestResponse) -> None:
    x = protocol.decode(req.x)
    b = x.shape[0]
    idx, dist = protocol.decode(resp.indices), protocol.decode(resp.distances)
    data = SMALL_X if resp.dataset == "small" else IMG_X
    assert idx.shape == dist.shape == (b, req.k)
    assert ((idx >= 0) & (idx < len(data))).all() and np.isfinite(dist).all() and (dist >= 0).all()
    assert (np.diff(dist, axis=1) >= -1e-12).all()
    assert resp.HasField("labels") == (resp.dataset == "small")
    if not req.HasField("t"):
        _, ref = ref_nearest(data, x.astype(np.float64), req.k)
        np.testing.assert_allclose(dist, ref, rtol=1e-5, atol=1e-6)


def _fingerprints(stub: pb_grpc.FlowOracleStub) -> dict[str, str]:
    return {d.name: d.fingerprint for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets}


# -- the decoder ---------------------------------------------------------------------------------


@FUZZ
@given(tensor=raw_tensors())
def test_decoder_returns_the_declared_array_or_raises_value_error(tensor: pb.Tensor):
    try:
        a = protocol.decode(tensor, "x_t")
    except ValueError:  # the codec's contract for bad wire tensors (the servicer: INVALID_ARGUMENT)
        return
    wd = {d.enum: d for d in protocol.DTYPES}[tensor.dtype]
    assert a.shape == tuple(tensor.shape)
    assert a.size * wd.itemsize == len(tensor.data)
    if wd.name != "bfloat16":
        assert a.tobytes() == tensor.data or a.dtype.byteorder not in ("=", "|", "<")


# -- the servicer --------------------------------------------------------------------------------


def _call(fn: Any, req: Any) -> tuple[Any, grpc.RpcError | None]:
    try:
        return fn(req, timeout=30), None
    except grpc.RpcError as exc:
        return None, exc


#: Outcomes seen by the fuzz tests ("Oracle:OK", "Nearest:INVALID_ARGUMENT", ...): the last test
#: checks that the fuzzing reached the engine often enough to mean something.
OUTCOMES: collections.Counter[str] = collections.Counter()


def _assert_intended(exc: grpc.RpcError, req: Any) -> None:
    assert exc.code() in ALLOWED, (exc.code(), exc.details(), req)
    assert exc.details(), "every refusal carries a message"


@FUZZ
@given(data=st.data())
def test_oracle_fuzz(stub: pb_grpc.FlowOracleStub, data: st.DataObject):
    req = data.draw(oracle_requests(_fingerprints_cached(stub)))
    resp, exc = _call(stub.Oracle, req)
    OUTCOMES[f"Oracle:{exc.code().name if exc is not None else 'OK'}"] += 1
    if exc is not None:
        _assert_intended(exc, req)
    else:
        _check_oracle_success(req, resp)


@FUZZ
@given(data=st.data())
def test_nearest_fuzz(stub: pb_grpc.FlowOracleStub, data: st.DataObject):
    req = data.draw(nearest_requests(_fingerprints_cached(stub)))
    resp, exc = _call(stub.Nearest, req)
    OUTCOMES[f"Nearest:{exc.code().name if exc is not None else 'OK'}"] += 1
    if exc is not None:
        _assert_intended(exc, req)
    else:
        _check_nearest_success(req, resp)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_fuzz_answers_each_message_in_order(stub: pb_grpc.FlowOracleStub, data: st.DataObject):
    reqs = data.draw(st.lists(oracle_requests(_fingerprints_cached(stub)), min_size=1, max_size=5))
    for i, r in enumerate(reqs):
        r.request_id = f"m{i}"
    answers = list(stub.OracleStream(iter(reqs), timeout=30))
    assert [a.request_id for a in answers] == [r.request_id for r in reqs]
    for req, ans in zip(reqs, answers, strict=True):
        OUTCOMES[f"OracleStream:{'OK' if ans.HasField('response') else ans.error_code}"] += 1
        if ans.HasField("response"):
            assert ans.error_code == 0
            _check_oracle_success(req, ans.response)
        else:
            assert ans.error_code in ALLOWED_NUMBERS and ans.error_message, (ans, req)


@FUZZ
@given(
    method=st.sampled_from(["Oracle", "Nearest", "DescribeDataset", "ListDatasets"]),
    payload=st.binary(max_size=200),
)
def test_raw_bytes_fuzz(raw_channel: grpc.Channel, method: str, payload: bytes):
    call = raw_channel.unary_unary(f"/floworacle.v1.FlowOracle/{method}")
    try:
        call(payload, timeout=30)
    except grpc.RpcError as exc:
        _assert_intended(exc, payload)


def test_oversized_message_is_resource_exhausted_and_the_server_goes_on(stub: pb_grpc.FlowOracleStub, raw_channel):
    big = np.zeros((MAX_MESSAGE // 32 + 1, 4), np.float64)  # over the 64 KiB limit
    t = np.full(len(big), 0.5)
    req = pb.OracleRequest(dataset="small", x_t=protocol.encode(big), t=protocol.encode(t))
    assert req.ByteSize() > MAX_MESSAGE
    with pytest.raises(grpc.RpcError) as info:
        stub.Oracle(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info2:
        raw_channel.unary_unary("/floworacle.v1.FlowOracle/Oracle")(b"\x00" * (MAX_MESSAGE + 10), timeout=30)
    assert info2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets) == 2


def test_after_fuzzing_answers_are_exact_and_no_internal_error_was_recorded(srv: RunningServer, stub):
    rng = np.random.default_rng(9)
    t = np.array([0.1, 0.5, 0.9, 0.99])
    xt = t[:, None] * SMALL_X[rng.integers(0, 40, 4)] + (1 - t[:, None]) * rng.standard_normal((4, 4))
    labels = np.array([-1, 0, 1, 2])
    req = pb.OracleRequest(
        dataset="small", x_t=protocol.encode(xt), t=protocol.encode(t), labels=protocol.encode(labels)
    )
    resp = stub.Oracle(req, timeout=30)
    ref = _reference_velocity(SMALL_X, SMALL_Y, xt, t, labels)
    assert max_rel(protocol.decode(resp.velocity), ref) < 1e-9
    near = stub.Nearest(pb.NearestRequest(dataset="img", x=protocol.encode(IMG_X[:3] + 0.01), k=3), timeout=30)
    assert (protocol.decode(near.indices)[:, 0] == np.arange(3)).all()
    if OUTCOMES:  # the fuzz tests ran in this session: they reached the engine and each refusal kind
        print(dict(OUTCOMES))
        assert OUTCOMES["Oracle:OK"] >= 10 and OUTCOMES["Nearest:OK"] >= 10 and OUTCOMES["OracleStream:OK"] >= 5
        assert OUTCOMES["Oracle:exact"] >= 10  # successes compared with the float64 reference
        for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"):
            assert OUTCOMES[f"Oracle:{code}"] > 0 and OUTCOMES[f"Nearest:{code}"] > 0, code
    reg = srv.server.metrics.registry
    for method in ("Oracle", "OracleStream", "Nearest", "ListDatasets", "DescribeDataset", "other"):
        for code in ("INTERNAL", "UNKNOWN"):
            got = reg.get_sample_value("floworacle_requests_total", {"method": method, "code": code})
            assert not got, (method, code, got)


def _reference_velocity(
    data: np.ndarray, data_labels: np.ndarray, xt: np.ndarray, t: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Linear path (alpha = t, sigma = 1 - t), written out here in float64 without the helpers:
    x1_hat = softmax(-|x_t - t x_i|^2 / (2 (1 - t)^2)) over the query's class, v = (x1_hat - x_t) / (1 - t)."""
    X = data.astype(np.float64)
    out = np.empty_like(xt)
    for i in range(len(xt)):
        rows = X if labels[i] < 0 else X[data_labels == labels[i]]
        logits = -((xt[i] - t[i] * rows) ** 2).sum(1) / (2 * (1 - t[i]) ** 2)
        w = np.exp(logits - logits.max())
        x1 = (w / w.sum()) @ rows
        out[i] = (x1 - xt[i]) / (1 - t[i])
    return out


_FPS: dict[str, str] = {}


def _fingerprints_cached(stub: pb_grpc.FlowOracleStub) -> dict[str, str]:
    if not _FPS:
        _FPS.update(_fingerprints(stub))
    return _FPS
