"""Wire tensors: numpy arrays and torch tensors to ``floworacle.v1.Tensor`` (dtype, shape, raw
little-endian row-major bytes) and back. The one dtype table of the project lives here.

numpy has no bfloat16: a bfloat16 wire tensor decodes to float32 in numpy (exactly) and to
bfloat16 in torch; numpy input sent as bfloat16 is rounded to nearest-even here. Messages are
plain protobuf: the payload is the tensor's ``data`` field as protobuf reads it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from floworacle.protocol._errors import RequestError
from floworacle.v1 import oracle_pb2 as pb

__all__ = [
    "CodecError",
    "WireDType",
    "DTYPES",
    "FLOAT_DTYPES",
    "dtype_by_name",
    "dtype_by_enum",
    "WireArray",
    "encode",
    "fill",
    "decode",
    "decode_torch",
    "to_like",
    "is_torch",
]


class CodecError(RequestError):
    """A wire tensor or an array that cannot be encoded / decoded; the message says how to fix it."""


@dataclass(frozen=True)
class WireDType:
    name: str
    enum: int
    itemsize: int
    numpy: str  # little-endian numpy dtype of the raw bytes (bfloat16: its uint16 bits)
    torch: str  # attribute name in torch
    is_float: bool


DTYPES: tuple[WireDType, ...] = (
    WireDType("float32", pb.DTYPE_FLOAT32, 4, "<f4", "float32", True),
    WireDType("float16", pb.DTYPE_FLOAT16, 2, "<f2", "float16", True),
    WireDType("bfloat16", pb.DTYPE_BFLOAT16, 2, "<u2", "bfloat16", True),
    WireDType("float64", pb.DTYPE_FLOAT64, 8, "<f8", "float64", True),
    WireDType("int64", pb.DTYPE_INT64, 8, "<i8", "int64", False),
)
#: Names of the float wire dtypes (queries, coefficients and float outputs travel in these).
FLOAT_DTYPES: tuple[str, ...] = tuple(d.name for d in DTYPES if d.is_float)
_BY_ENUM = {d.enum: d for d in DTYPES}
_BY_NAME = {d.name: d for d in DTYPES}


def dtype_by_name(name: str) -> WireDType:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CodecError(f"unsupported dtype {name!r}; use one of {sorted(_BY_NAME)}") from None


def dtype_by_enum(value: int, field: str = "dtype") -> WireDType:
    """The wire dtype of enum ``value``; CodecError naming the accepted ones otherwise."""
    wd = _BY_ENUM.get(value)
    if wd is None:
        names = ", ".join(f"{d.name} ({d.enum})" for d in DTYPES)
        raise CodecError(f"{field}: dtype {value} is not supported; use one of {names}")
    return wd


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch)."""
    mod = sys.modules.get("torch")
    return mod is not None and isinstance(x, mod.Tensor)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaN stays NaN.

    ``(bits + 0x7FFF + lsb) >> 16`` with ``lsb`` the lowest bit kept (uint32 arithmetic), done in
    place on one temporary: every fresh MB-sized buffer costs page faults."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    acc = bits >> np.uint32(16)
    acc &= np.uint32(1)
    acc += np.uint32(0x7FFF)
    acc += bits
    acc >>= np.uint32(16)
    rounded = acc.astype("<u2")
    if a.size and np.isnan(np.max(a)):  # max propagates NaN: build the mask only when needed
        nan = np.isnan(a)
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
    return rounded


def _widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16, any byte order) -> the exactly equal float32 values (a new array)."""
    wide = bits.astype(np.uint32)
    wide <<= np.uint32(16)
    return wide.view(np.float32)


def _source_name(x: Any) -> str:
    if is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    # .name, not str(): a big-endian float32 array is "float32" too (str() gives ">f4")
    return np.asarray(x).dtype.name


def _torch_cpu_numpy(t: Any) -> np.ndarray:
    """A CPU torch tensor as numpy without a torch dtype conversion (bfloat16 widens exactly to
    float32 by a bit shift). Dtype conversions go through numpy on purpose: torch runs them on its
    intra-op thread pool, which on a busy CPU was measured at ~12 ms for a 3 MB tensor against
    0.1 ms in numpy (the threads wait for each other's time slices)."""
    import torch

    if t.dtype == torch.bfloat16:
        return _widen_bf16(t.contiguous().view(torch.int16).numpy().view(np.uint16))
    return t.numpy()


#: Elements per block of :func:`_cast_inline`: below torch's grain size for elementwise ops (32,768),
#: which it runs on the calling thread instead of its intra-op pool.
_INLINE_BLOCK = 32768


def _torch_rounds(target: str, source: Any) -> bool:
    """Whether torch rounds ``source`` (a torch float dtype) to the wire dtype ``target`` exactly as
    the codec does: to bfloat16 from anything (both round through float32), to float16 from
    float32 and below. From float64 torch rounds to float16 through float32 too, which a tie can
    make 1 ulp off the correctly rounded value numpy gives, so that one stays numpy's."""
    import torch

    if source is None or not source.is_floating_point:
        return False
    if target == "bfloat16":
        return True
    return target == "float16" and source != torch.float64


def _cast_inline(t: Any, dtype: Any) -> Any:
    """A CPU tensor converted to ``dtype`` on the calling thread, in blocks below torch's grain size.

    Above it torch splits an elementwise op over its intra-op thread pool, whose threads wait for
    each other's time slices on a busy CPU: a 3 MB float64 -> bfloat16 conversion took 10-12 ms
    at two threads on a loaded 2-core VM against 0.2 ms in blocks (0.14 ms at one thread)."""
    import torch

    flat = t.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype)
    for start in range(0, flat.numel(), _INLINE_BLOCK):
        out[start : start + _INLINE_BLOCK].copy_(flat[start : start + _INLINE_BLOCK])
    return out.reshape(t.shape)


def encode(x: Any, dtype: str | None = None) -> pb.Tensor:
    """Encode an array as a wire tensor.

    Args:
        x: numpy array, torch tensor (any device; bfloat16 included) or nested sequence.
        dtype: wire dtype name ("float32", "float16", "bfloat16", "float64", "int64");
            None keeps the array's own dtype (which must be one of those).
    """
    out = pb.Tensor()
    WireArray.encode(x, dtype).fill(out)
    return out


class WireArray:
    """An array in its wire form: a wire dtype and a C-contiguous numpy array holding exactly the
    bytes a ``floworacle.v1.Tensor`` carries (bfloat16 as its uint16 bits, which numpy lacks).

    It is what a query holds between the caller's array and the message: :meth:`encode` makes it
    from a numpy array or torch tensor (one conversion, or none when the array already is in the
    wire dtype), :meth:`decode` from a received tensor (a view of the bytes protobuf handed out, no
    further copy), :meth:`fill` writes rows of it into a message, :meth:`numpy` and :meth:`torch`
    read it as numbers (torch: a view, bfloat16 included; numpy: bfloat16 widens exactly to float32).
    """

    __slots__ = ("dtype", "data")

    def __init__(self, dtype: WireDType, data: np.ndarray) -> None:
        self.dtype = dtype
        self.data = data

    def __repr__(self) -> str:
        return f"WireArray({self.dtype.name}, shape={self.shape})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @classmethod
    def encode(cls, x: Any, dtype: str | None = None) -> WireArray:
        """``x`` (numpy array, torch tensor on any device, or nested sequence) in wire dtype ``dtype``
        (None: its own, which must be a wire dtype; small integers become int64). The data may share
        memory with ``x`` when ``x`` is a numpy array or CPU tensor already in the wire dtype."""
        name = dtype or _source_name(x)
        if name in ("int32", "int16", "int8", "uint8") and dtype is None:
            name = "int64"
        wd = dtype_by_name(name)
        if is_torch(x):
            import torch

            t = x.detach()
            if t.is_complex():
                raise CodecError("complex tensors are not supported")
            if t.device.type != "cpu":
                t = t.to(getattr(torch, wd.torch)).cpu()  # convert on the device: fewer bytes to copy back
            if t.dtype == torch.bfloat16 and wd.name == "bfloat16":
                arr = np.ascontiguousarray(t.contiguous().view(torch.int16).numpy(), dtype="<i2")
            elif _torch_rounds(wd.name, t.dtype):
                # torch rounds to the 2-byte floats in one pass (numpy needs several for bfloat16 and
                # is ~10x slower for float16; the same bits: tested), on this thread (_cast_inline)
                half = _cast_inline(t, getattr(torch, wd.torch))
                view = half.view(torch.int16) if wd.name == "bfloat16" else half
                arr = np.ascontiguousarray(view.numpy(), dtype="<i2" if wd.name == "bfloat16" else "<f2")
            else:
                a = _torch_cpu_numpy(t)
                with np.errstate(over="ignore"):  # overflow to inf, as torch converts, without a warning
                    if wd.name == "bfloat16":
                        arr = np.ascontiguousarray(_bf16_bits(a.astype(np.float32, copy=False)), dtype="<u2")
                    else:
                        arr = np.ascontiguousarray(a, dtype=wd.numpy)
            arr = arr.reshape(tuple(t.shape))
        else:
            a = np.asarray(x)
            if a.dtype.kind not in "fiub":
                raise CodecError(f"cannot encode an array of dtype {a.dtype}; send floats or integers")
            loaded = sys.modules.get("torch")
            fits = False
            if loaded is not None and a.size >= _INLINE_BLOCK and a.dtype.kind == "f" and a.dtype.itemsize <= 8:
                fits = _torch_rounds(wd.name, getattr(loaded, np.dtype(a.dtype).newbyteorder("=").name, None))
            if fits and loaded is not None:
                # where torch is loaded anyway, it rounds a large array in one pass (numpy needs seven
                # for bfloat16 and is ~15x slower for float16; the same bits: tested)
                native = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
                return cls.encode(loaded.from_numpy(native), wd.name)
            with np.errstate(over="ignore"):  # overflow to inf, as in the torch branch, without a warning
                if wd.name == "bfloat16":
                    arr = np.ascontiguousarray(_bf16_bits(a.astype(np.float32, copy=False)), dtype="<u2")
                else:
                    arr = np.ascontiguousarray(a, dtype=wd.numpy)
        return cls(wd, arr)

    @classmethod
    def decode(cls, t: pb.Tensor, field: str = "tensor") -> WireArray:
        """A received wire tensor, validated (dtype, shape, byte count); a read-only view of its bytes."""
        wd, shape, data = _check(t, field)
        return cls(wd, np.frombuffer(data, dtype=wd.numpy).reshape(shape))

    def rows(self, start: int, stop: int | None = None) -> WireArray:
        """Rows [start, stop) (a view)."""
        return WireArray(self.dtype, self.data[start:stop])

    def reshape(self, *shape: int) -> WireArray:
        return WireArray(self.dtype, self.data.reshape(shape))

    def fill(self, field: pb.Tensor, start: int = 0, stop: int | None = None) -> None:
        """Set the message tensor ``field`` to rows [start, stop) (None: to the end)."""
        arr = self.data
        if arr.ndim and (start or (stop is not None and stop != arr.shape[0])):
            arr = arr[start:stop]
        field.dtype = self.dtype.enum  # type: ignore[assignment]
        del field.shape[:]
        field.shape.extend(int(d) for d in arr.shape)
        field.data = arr.tobytes()

    def nonfinite_row(self) -> int | None:
        """The first row (of a (B, ...) float array) holding a NaN or an infinity, or None.

        A value is not finite iff its exponent bits are all ones, so the check reads the bits:
        one pass over the 2-byte dtypes without widening them (numpy's float16 min / max is ~300x
        slower); float32 and float64 use min / max, which propagate NaN and meet any infinity. Only a
        failing request pays for the scan that names the row."""
        a = self.data
        if a.size == 0 or not self.dtype.is_float:
            return None
        if self.dtype.itemsize == 2:
            top = 0x7F80 if self.dtype.name == "bfloat16" else 0x7C00  # exponent all ones
            magnitude = a.view(np.uint16) & np.uint16(0x7FFF)
            if int(magnitude.max()) < top:
                return None
            bad = (magnitude >= top).reshape(a.shape[0], -1).any(axis=1)
        else:
            if np.isfinite(a.min()) and np.isfinite(a.max()):
                return None
            bad = ~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
        return int(np.flatnonzero(bad)[0])

    def numpy(self) -> np.ndarray:
        """The values in native byte order: a view (bfloat16: exactly widened to a float32 copy)."""
        if self.dtype.name == "bfloat16":
            return _widen_bf16(self.data)
        return self.data.astype(np.dtype(self.dtype.numpy).newbyteorder("="), copy=False)

    def torch(self) -> Any:
        """The values as a torch tensor of the wire dtype sharing this array's memory (read-only
        memory stays read-only: the engine never writes to its input)."""
        import torch

        a = self.data
        if self.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a.astype(np.dtype(self.dtype.numpy).newbyteorder("="), copy=False))


def fill(field: pb.Tensor, x: Any, dtype: str | None = None) -> None:
    """Encode ``x`` (as :func:`encode`) straight into a message's tensor field (``field.CopyFrom(
    encode(x))`` would copy the bytes once more)."""
    WireArray.encode(x, dtype).fill(field)


_MAX_DIMS = 16
_MAX_SPAN = 1 << 48


def _meta(t: pb.Tensor, field: str) -> tuple[WireDType, tuple[int, ...]]:
    """Validated dtype and shape of a wire tensor (its bytes untouched)."""
    wd = dtype_by_enum(t.dtype, field)
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise CodecError(f"{field}: shape {list(shape)} has a negative dimension")
    if len(shape) > _MAX_DIMS:
        raise CodecError(f"{field}: shape {list(shape)} has {len(shape)} dimensions; at most {_MAX_DIMS} are accepted")
    span = 1
    for s in shape:
        span *= max(s, 1)
    if span > _MAX_SPAN:
        # even with a zero dimension (no bytes) such a shape cannot be laid out as an array
        raise CodecError(f"{field}: shape {list(shape)} is far too large (its non-zero dimensions multiply to {span})")
    return wd, shape


def _check(t: pb.Tensor, field: str) -> tuple[WireDType, tuple[int, ...], bytes]:
    """Validate dtype, shape and byte count; returns them with the raw bytes. ``t.data`` makes a
    new bytes object (a full copy) on every access, so it is read here once and handed on."""
    wd, shape = _meta(t, field)
    count = 1
    for s in shape:
        count *= s
    data = t.data
    if count * wd.itemsize != len(data):
        raise CodecError(
            f"{field}: {len(data)} bytes do not match shape {list(shape)} of {wd.name} "
            f"({count} elements x {wd.itemsize} bytes = {count * wd.itemsize}); send row-major raw bytes"
        )
    return wd, shape, data


def decode(t: pb.Tensor, field: str = "tensor") -> np.ndarray:
    """Wire tensor -> numpy array (native byte order). bfloat16 decodes exactly to float32.

    Other dtypes come back as a read-only view of the bytes protobuf handed out for the field
    (no further copy on a little-endian machine); copy it to write to it."""
    wd, shape, data = _check(t, field)
    a = np.frombuffer(data, dtype=wd.numpy).reshape(shape)
    if wd.name == "bfloat16":
        return _widen_bf16(a)
    return a.astype(np.dtype(wd.numpy).newbyteorder("="), copy=False)


def decode_torch(t: pb.Tensor, field: str = "tensor", device: Any = None) -> Any:
    """Wire tensor -> torch tensor of the wire dtype (bfloat16 kept), optionally on ``device``."""
    import torch

    wd, shape, data = _check(t, field)
    raw = np.frombuffer(data, dtype=wd.numpy)
    if wd.name == "bfloat16":
        out = torch.from_numpy(raw.astype(np.int16, copy=True)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(raw.astype(np.dtype(wd.numpy).newbyteorder("="), copy=True))
    out = out.reshape(shape)
    return out.to(device) if device is not None else out


def to_like(t: pb.Tensor, like: Any, field: str = "tensor", keep_wire_dtype: bool = False) -> Any:
    """Decode ``t`` into the caller's array type: torch tensors keep dtype and device of ``like``
    (unless ``keep_wire_dtype``), numpy arrays keep their float dtype where numpy has it."""
    if is_torch(like):
        import torch

        wd, shape = _meta(t, field)
        want = like.dtype if (not keep_wire_dtype and wd.name != "int64" and like.is_floating_point()) else None
        if want is None or (want == torch.bfloat16 and wd.name == "bfloat16"):
            out = decode_torch(t, field)
        elif want == torch.bfloat16:  # float wire -> bfloat16 caller: round to nearest even in numpy
            with np.errstate(over="ignore"):
                bits = _bf16_bits(decode(t, field).astype(np.float32, copy=False))
            out = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(shape)
        else:  # convert in numpy (see _torch_cpu_numpy); the copy makes the buffer writable
            np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}[want]
            with np.errstate(over="ignore"):
                out = torch.from_numpy(np.array(decode(t, field), dtype=np_dtype, copy=True))
        return out.to(like.device) if like.device.type != "cpu" else out
    out = decode(t, field)
    like_dtype = getattr(like, "dtype", None)
    if not keep_wire_dtype and like_dtype is not None and np.dtype(like_dtype).kind == "f" and out.dtype.kind == "f":
        out = out.astype(like_dtype, copy=False)
    return out
