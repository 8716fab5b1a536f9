"""The protocol's queries: what the SDK builds is what the server reads, chunks and merges keep
every row, the batch key separates what must not share an engine call, a gang's parts rebuild
the query, and an answer's size is known before it is computed."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from floworacle.paths import COEFFICIENT_NAMES, PathCoefficients
from floworacle.protocol import (
    MESSAGE_OVERHEAD,
    OUTPUT_NAMES,
    ROWS,
    SHARED,
    DatasetFacts,
    Guidance,
    NearestQuery,
    OracleQuery,
    RequestError,
    SpaceFacts,
    WireArray,
    from_parts,
    to_parts,
)

RNG = np.random.default_rng(0)
FACTS = DatasetFacts("d", 100, 12, (3, 2, 2), num_classes=4, spaces={"data": SpaceFacts(12)})


def _x(b: int = 6, dtype: str = "float32") -> np.ndarray:
    return RNG.standard_normal((b, 12)).astype(dtype)


def _same(a: OracleQuery | NearestQuery, b: OracleQuery | NearestQuery) -> None:
    for f in fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, WireArray):
            assert va.dtype == vb.dtype and np.array_equal(va.data, vb.data), f.name
        elif isinstance(va, PathCoefficients):
            for n in COEFFICIENT_NAMES:
                np.testing.assert_array_equal(getattr(va, n), getattr(vb, n), err_msg=f.name)
        elif isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb, err_msg=f.name)
        else:
            assert va == vb, f.name


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "float64"])
def test_what_the_sdk_builds_is_what_the_server_reads(wire: str) -> None:
    b = 6
    cases = [
        OracleQuery.build(_x(b), RNG.uniform(0.1, 0.9, b), wire_dtype=wire, dataset="d", fingerprint="sha256:x"),
        OracleQuery.build(
            _x(b), 0.4, labels=np.arange(b) % 5 - 1, exclude=[3, -1, 4, -1, 5, -1], guidance=1.5,
            guidance_interval=(0.2, 0.6), outputs=OUTPUT_NAMES, top_k=3, precision="fast", wire_dtype=wire,
        ),
        OracleQuery.build(_x(b), None, coefficients=(0.5, 0.5, 1.0, -1.0), wire_dtype=wire),
        OracleQuery.build(_x(b), 0.3, path="cosine", wire_dtype=wire),
        OracleQuery.build(_x(b), 0.3, sigma_min=0.01, wire_dtype=wire),
    ]  # fmt: skip
    for q in cases:
        back = OracleQuery.from_request(q.to_request(), max_rows=100)
        _same(q, back)


def test_nearest_round_trip_and_the_reversed_convention() -> None:
    for q in (
        NearestQuery.build(_x(), 3, exclude=np.arange(6) - 1, exact=False, nprobe=2, dataset="d"),
        NearestQuery.build(_x(), 2, t=0.7, space="data", exact=True),
        NearestQuery.build(_x(), 1),
    ):
        _same(q, NearestQuery.from_request(q.to_request(), max_rows=100))
    s = np.array([0.25, 0.5, 0.75, 0.1, 0.2, 0.3])
    rev = OracleQuery.build(
        _x(), s, convention="reversed", guidance=2.0, labels=np.zeros(6), guidance_interval=(0.1, 0.3)
    )
    np.testing.assert_allclose(rev.t, 1 - s)
    assert rev.guidance == Guidance(2.0, 0.7, 0.9)
    with pytest.raises(RequestError, match="convention='reversed' is the linear path"):
        OracleQuery.build(_x(), s, convention="reversed", path="cosine")


def test_chunks_carry_every_row_once() -> None:
    q = OracleQuery.build(_x(10), np.linspace(0.1, 0.9, 10), labels=np.arange(10) % 3, coefficients=None)
    parts = [OracleQuery.from_request(q.to_request(a, b), 100) for a, b in ((0, 4), (4, 7), (7, 10))]
    whole = OracleQuery.concat(parts)
    np.testing.assert_array_equal(whole.x_t, q.x_t.numpy())
    np.testing.assert_array_equal(whole.t, q.t)
    np.testing.assert_array_equal(whole.labels, q.labels)
    np.testing.assert_array_equal(whole.coeffs.alpha, q.coeffs.alpha)


def test_concat_fills_missing_rows_and_merges_by_role() -> None:
    a = OracleQuery.build(_x(2), 0.5, labels=[1, 2], outputs=("velocity",))
    b = OracleQuery.build(_x(3, "float16"), 0.6, exclude=[7, -1, 9], outputs=("x1_hat", "topk"), top_k=4)
    assert a.key == b.key  # labels, exclusions, outputs and dtypes may differ within one engine call
    m = OracleQuery.concat([a, b])
    assert m.rows == 5 and m.x_t.dtype == np.float32  # float16 promoted exactly
    np.testing.assert_array_equal(m.labels, [1, 2, -1, -1, -1])
    np.testing.assert_array_equal(m.exclude, [-1, -1, 7, -1, 9])
    assert m.outputs == ("velocity", "x1_hat", "topk") and m.top_k == 4
    assert m.dataset == "" and m.request_id == ""  # a request's own fields are not the engine's
    shared = [f.name for f in fields(OracleQuery) if f.metadata["role"] == SHARED]
    assert set(shared) == {"guidance", "precision", "knn_k", "knn_tail", "kind"}
    assert OracleQuery.build(_x(2), 0.5, precision="fast").key != a.key
    assert OracleQuery.build(_x(2), 0.5, labels=[0, 1], guidance=2.0).key != a.key
    posterior = NearestQuery.build(_x(2), 1, t=0.5)
    assert posterior.key != NearestQuery.build(_x(2), 1).key  # coefficients present or not
    with pytest.raises(AssertionError, match="differ in precision"):
        OracleQuery.concat([a, replace(b, precision="fast")])


def test_a_query_in_parts_is_the_query() -> None:
    q = OracleQuery.build(_x(4), 0.5, labels=[0, -1, 2, 3], guidance=2.0, wire_dtype="bfloat16", top_k=2,
                          outputs=("velocity", "topk"))  # fmt: skip
    meta, arrays = to_parts(q)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert set(arrays) >= {"x_t", "t", "labels", *(f"coeffs.{n}" for n in COEFFICIENT_NAMES)}
    rows = [f.name for f in fields(OracleQuery) if f.metadata["role"] == ROWS]
    assert set(rows) == {"x_t", "coeffs", "t", "labels", "exclude", "patch_size"}
    # what travels: bytes of each array, rebuilt from the shapes and dtypes in the values
    sent = {k: np.frombuffer(a.tobytes(), np.dtype(meta["arrays"][k][1])).reshape(meta["arrays"][k][0])
            for k, a in arrays.items()}  # fmt: skip
    _same(q, from_parts(meta, sent))
    n = NearestQuery.build(_x(3), 2, exclude=[1, -1, 2])
    _same(n, from_parts(*to_parts(n)))


def test_check_applies_the_data_sets_facts() -> None:
    q = OracleQuery.build(_x(5).reshape(5, 3, 2, 2), 0.5)
    checked = q.check(FACTS)
    assert checked.x_t.shape == (5, 12) and checked.sample_shape == (3, 2, 2)
    with pytest.raises(RequestError, match=r"expects \(B, 12\) or \(B, 3, 2, 2\)"):
        OracleQuery.build(RNG.standard_normal((2, 13)), 0.5).check(FACTS)
    with pytest.raises(RequestError, match="outside the classes 0..3"):
        OracleQuery.build(_x(2), 0.5, labels=[4, 0]).check(FACTS)
    with pytest.raises(RequestError, match="past the data set's 100 samples"):
        OracleQuery.build(_x(2), 0.5, exclude=[100, 0]).check(FACTS)
    bad = _x(2)
    bad[1, 3] = np.inf
    with pytest.raises(RequestError, match=r"x_t\[1\] has a NaN or Inf"):
        OracleQuery.build(bad, 0.5).check(FACTS)
    with pytest.raises(RequestError, match="has no nearest index") as err:
        NearestQuery.build(_x(2), 1, exact=False).check(FACTS)
    assert err.value.code.name == "FAILED_PRECONDITION"


@pytest.mark.parametrize("outputs", [("velocity",), OUTPUT_NAMES, ("topk", "entropy", "variance")])
def test_the_answer_size_is_known_before_computing(outputs: tuple[str, ...]) -> None:
    b, k = 7, 5
    q = OracleQuery.build(_x(b), 0.5, outputs=outputs, top_k=k, wire_dtype="float16").check(FACTS)
    values = {
        "velocity": np.ones((b, 12)), "x1_hat": np.ones((b, 12)), "eps_hat": np.ones((b, 12)),
        "score": np.ones((b, 12)), "topk_indices": np.ones((b, k), np.int64), "topk_weights": np.ones((b, k)),
        "entropy": np.ones(b), "ess": np.ones(b), "variance": np.ones(b), "variance_error_bound": np.ones(b),
        "entropy_error_bound": np.ones(b), "ess_error_bound": np.ones(b),
        "x1_hat_error_bound": np.ones(b), "velocity_error_bound": np.ones(b),
    }  # fmt: skip
    size = replace(q, dataset="d" * 40, fingerprint="sha256:" + "0" * 64).response(type("R", (), values)()).ByteSize()
    assert size <= q.answer_bytes() <= size + MESSAGE_OVERHEAD


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "float64"])
def test_non_finite_points_are_found_by_their_bits_in_every_wire_dtype(wire: str) -> None:
    big = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.7976e308}[wire]
    x = np.zeros((5, 12))
    x[1, 2], x[3, 5] = big, -big  # the largest finite values of the dtype pass
    assert WireArray.encode(x, wire).nonfinite_row() is None
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[4, 11], y[2, 0] = bad, bad
        w = WireArray.encode(y, wire)
        assert w.nonfinite_row() == 2
        query = replace(OracleQuery.build(np.zeros((5, 12)), 0.5), x_t=w)
        with pytest.raises(RequestError, match=r"x_t\[2\] has a NaN or Inf"):
            OracleQuery.from_request(query.to_request(), 9).check(replace(FACTS, sample_shape=(12,)))


def test_the_reversed_convention_is_answered_in_s() -> None:
    with pytest.raises(RequestError, match=r"s\[0\] = 0 is outside \[0.0001, 1\] for the reversed convention"):
        OracleQuery.build(_x(1), 0.0, convention="reversed")
    with pytest.raises(RequestError, match=r"0 <= s_lo <= s_hi <= 1, got \[0.6, 0.2\]"):
        OracleQuery.build(_x(1), 0.5, convention="reversed", labels=[0], guidance=2.0, guidance_interval=(0.6, 0.2))
    with pytest.raises(RequestError, match=r"s\[1\] = nan is not finite"):
        NearestQuery.build(_x(2), 1, t=[0.5, np.nan], convention="reversed")


def test_output_dtype_messages_offer_only_float_dtypes() -> None:
    req = OracleQuery.build(_x(2), 0.5).to_request()
    for value in (99, 5):  # unknown, and int64: neither is a float wire dtype
        req.output_dtype = value  # type: ignore[assignment]
        with pytest.raises(RequestError) as err:
            OracleQuery.from_request(req, 10)
        assert f"output_dtype {value} is not a float wire dtype" in err.value.details
        assert "int64" not in err.value.details and "float32 (1)" in err.value.details
