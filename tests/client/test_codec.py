"""The wire format, pinned byte-for-byte: dtype table, little-endian row-major bytes, bfloat16
round-to-nearest-even (numpy and torch agree), zero-size tensors, byte order, bad wire tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle.protocol import CodecError, decode, decode_torch, encode, to_like
from floworacle.v1 import oracle_pb2 as pb

GOLDEN = [
    # (values, wire dtype, enum, little-endian bytes)
    ([1.0, -2.0], "float32", pb.DTYPE_FLOAT32, bytes.fromhex("0000803f000000c0")),
    ([1.0, -2.0], "float16", pb.DTYPE_FLOAT16, bytes.fromhex("003c00c0")),
    ([1.0, -2.0], "float64", pb.DTYPE_FLOAT64, bytes.fromhex("000000000000f03f00000000000000c0")),
    ([1.0, -2.0], "bfloat16", pb.DTYPE_BFLOAT16, bytes.fromhex("803f00c0")),
]


@pytest.mark.parametrize(("values", "name", "enum", "raw"), GOLDEN)
def test_golden_bytes_numpy_and_torch(values: list[float], name: str, enum: int, raw: bytes) -> None:
    for source in (np.array(values, dtype=np.float64), torch.tensor(values, dtype=torch.float64)):
        t = encode(source, name)
        assert t.dtype == enum
        assert list(t.shape) == [2]
        assert t.data == raw
    # and the serialized message itself: field 1 varint, field 2 packed shape, field 3 bytes
    msg = encode(np.array(values), name).SerializeToString()
    assert msg == bytes([0x08, enum, 0x12, 0x01, 0x02, 0x1A, len(raw)]) + raw


def test_int64_golden() -> None:
    t = encode(np.array([1, -1], dtype=np.int64))
    assert t.dtype == pb.DTYPE_INT64
    assert t.data == bytes.fromhex("0100000000000000ffffffffffffffff")
    assert decode(t).tolist() == [1, -1]


# float32 bit patterns -> bfloat16 bits, round to nearest, ties to even.
BF16_ROUNDING = [
    (0x3F808000, 0x3F80),  # 1 + 2^-8: tie, even stays
    (0x3F818000, 0x3F82),  # 1 + 3 * 2^-8: tie, odd rounds up
    (0x3F808001, 0x3F81),  # just above the tie
    (0x3F807FFF, 0x3F80),  # just below the tie
    (0xBF818000, 0xBF82),  # negative tie
    (0x7F7FFFFF, 0x7F80),  # float32 max rounds to +inf
    (0x7F800000, 0x7F80),  # +inf
    (0x00000001, 0x0000),  # smallest subnormal rounds to zero
]


@pytest.mark.parametrize(("f32", "bf16"), BF16_ROUNDING)
def test_bfloat16_rounding_pinned(f32: int, bf16: int) -> None:
    x = np.array([f32], dtype="<u4").view("<f4")
    want = bf16.to_bytes(2, "little")
    assert encode(x, "bfloat16").data == want
    assert encode(torch.from_numpy(x.copy()), "bfloat16").data == want


def test_bfloat16_from_torch_equals_numpy_rounding() -> None:
    # torch tensors are rounded by torch (one pass), numpy arrays by the codec's own bit
    # arithmetic: the same bits, float64 included (both round to float32 first), NaN and inf too
    rng = np.random.default_rng(4)
    x = rng.standard_normal(4096) * np.exp(rng.uniform(-30, 30, 4096))
    ties = np.array([0x3F808000, 0x3F818000, 0xBF818000, 0x7F7FFFFF], dtype="<u4").view("<f4")
    x = np.concatenate([x, ties.astype(np.float64), [np.inf, -np.inf, 1e39, -1e39]])
    for dtype in (np.float64, np.float32):
        with np.errstate(over="ignore"):
            a = x.astype(dtype)
        assert encode(torch.from_numpy(a), "bfloat16").data == encode(a, "bfloat16").data
    nan = encode(torch.tensor([np.nan, 1.0], dtype=torch.float64), "bfloat16")
    assert np.isnan(decode(nan)[0]) and decode(nan)[1] == 1.0


def test_bfloat16_nan_stays_nan() -> None:
    t = encode(np.array([np.nan], dtype=np.float32), "bfloat16")
    assert np.isnan(decode(t)).all()
    assert torch.isnan(decode_torch(t)).all()


def test_bfloat16_decodes_exactly() -> None:
    t = pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[3], data=bytes.fromhex("803f00c0c13f"))
    a = decode(t)
    assert a.dtype == np.float32
    assert a.tolist() == [1.0, -2.0, 1.5078125]
    b = decode_torch(t)
    assert b.dtype == torch.bfloat16
    assert b.float().tolist() == [1.0, -2.0, 1.5078125]


def test_row_major_and_fortran_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = np.arange(6, dtype="<f4").tobytes()
    assert encode(a).data == want
    assert encode(np.asfortranarray(a)).data == want
    assert encode(torch.from_numpy(a).t().contiguous().t()).data == want  # non-contiguous torch view
    assert list(encode(a).shape) == [2, 3]


def test_big_endian_input_goes_little_endian() -> None:
    a = np.array([1.0, -2.0], dtype=">f4")
    assert encode(a).data == bytes.fromhex("0000803f000000c0")
    out = decode(encode(a))
    assert out.dtype.byteorder in ("=", "|", "<")
    assert out.tolist() == [1.0, -2.0]


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64"])
def test_zero_size(name: str) -> None:
    t = encode(np.zeros((0, 5), dtype=np.float32), name)
    assert t.data == b""
    assert list(t.shape) == [0, 5]
    assert decode(t).shape == (0, 5)
    assert tuple(decode_torch(t).shape) == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_to_like_keeps_torch_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    back = to_like(encode(x), x)
    assert back.dtype == dtype
    assert torch.equal(back, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_to_like_keeps_numpy_dtype(dtype: type) -> None:
    x: np.ndarray = np.random.default_rng(0).standard_normal((3, 4)).astype(dtype)
    back = to_like(encode(x), x)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "dtype 99 is not supported"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "not supported"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12), "12 bytes do not match shape"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1], data=b""), "negative"),
    ],
)
def test_bad_wire_tensors(tensor: pb.Tensor, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(tensor, "x_t")
    with pytest.raises(ValueError, match=match):  # CodecError is a ValueError
        decode_torch(tensor, "x_t")


def test_bad_inputs() -> None:
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode(np.zeros(2), "int8")
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode(np.array(["a"]))
    with pytest.raises(CodecError, match="cannot encode"):
        encode(np.array(["a"]), "float32")
    with pytest.raises(CodecError, match="complex"):
        encode(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip() -> None:
    x = torch.randn(4, 3, dtype=torch.bfloat16, device="cuda")
    t = encode(x)
    assert t.data == encode(x.cpu()).data
    back = to_like(t, x)
    assert back.device == x.device and back.dtype == torch.bfloat16
    assert torch.equal(back, x)


def test_conversions_match_torch_bit_for_bit() -> None:
    """The codec converts dtypes in numpy (fast on busy CPUs); the results equal torch's own
    conversions bit for bit, overflow to inf and subnormals included."""
    scale = torch.logspace(-42, 42, 2000, dtype=torch.float64)
    base = torch.randn(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale
    names = ("float32", "float16", "bfloat16", "float64")
    for src in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        y = base.to(src)
        for name in names:
            wire = encode(y, name)
            assert wire.data == encode(y.to(getattr(torch, name)), name).data, (src, name)
            for like in names:
                got = to_like(wire, torch.zeros(1, dtype=getattr(torch, like)))
                want = y.to(getattr(torch, name)).to(getattr(torch, like))
                assert got.dtype == want.dtype and torch.equal(got, want), (src, name, like)


def test_two_byte_conversions_in_blocks_equal_torch_for_large_tensors() -> None:
    """Tensors larger than torch's grain size are converted block by block on the calling thread
    (its thread pool is slow on a busy CPU): the bits and the shape equal one torch conversion
    (float64 -> float16 stays numpy's, rounded once)."""
    g = torch.Generator().manual_seed(5)
    y64 = torch.randn(97, 1031, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, 1031, dtype=torch.float64)
    for y in (y64, y64.to(torch.float32)):
        for name in ("float16", "bfloat16"):
            wire = encode(y, name)
            assert list(wire.shape) == [97, 1031]
            if name == "float16" and y.dtype == torch.float64:
                with np.errstate(over="ignore"):
                    want = np.ascontiguousarray(y.numpy().astype(np.float16)).tobytes()
            else:
                want = encode(y.to(getattr(torch, name)), name).data
            assert wire.data == want, (y.dtype, name)
            assert wire.data == encode(y.t().contiguous().t(), name).data  # a non-contiguous view: the same


def test_large_numpy_arrays_round_to_two_byte_floats_as_small_ones_do() -> None:
    """A large numpy array is rounded by torch when torch is loaded, a small one by the codec's own
    numpy arithmetic: the bits are the same (float16 and bfloat16, float32 and float64 inputs,
    big-endian ones included)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(70_000) * np.exp(rng.uniform(-20, 20, 70_000))
    for src in (np.float64, np.float32, ">f4", ">f8"):
        a = x.astype(src)
        for name in ("float16", "bfloat16"):
            whole = encode(a, name).data
            pieces = b"".join(encode(a[i : i + 1000], name).data for i in range(0, a.size, 1000))
            assert whole == pieces, (src, name)


def test_float64_to_float16_is_rounded_once() -> None:
    """1 + 2^-11 + 2^-40 lies just above a float16 tie: rounded once it goes up; rounded through
    float32 (torch's float64 -> float16) it would land on the tie and go to even, 1.0."""
    x = np.array([1 + 2**-11 + 2**-40] * 40_000)
    for a in (x, torch.from_numpy(x)):
        assert decode(encode(a, "float16"))[0] == 1 + 2**-10
