"""Tensor payloads on the wire without protobuf's copies.

Python protobuf copies a ``bytes`` field three times on its way out (into the message, into the
serialized string, into gRPC) and twice on its way in (parsing, then every read of the field
makes a new ``bytes``). For a B = 256, D = 3,072 batch those are 3 MB copies, each of which
costs more than the rest of the SDK's work per call. This module keeps the messages standard
protobuf on the wire while moving the payloads of ``floworacle.v1.Tensor.data`` by reference:

* Sending (:class:`Outgoing`): the message is serialized with its tensors' dtype and shape
  but empty ``data``; each payload is appended as one more occurrence of its tensor field that
  holds only ``data``. Protobuf merges repeated occurrences of a message field, so every
  conforming parser (the generated stubs, grpcurl, other languages) reads one tensor with dtype,
  shape and data. The payload is copied once, into the outgoing bytes.
* Receiving (:func:`parse`): a scan over the field structure finds each tensor's ``data``
  without touching the payload, the rest (a few hundred bytes) is parsed by protobuf, and the
  tensors are handed out as :class:`TensorView` objects whose ``data`` is a memoryview into the
  received bytes. Anything unusual about the framing (groups, truncation, lengths past the end)
  falls back to protobuf's own parser on the whole message, which then accepts or rejects it as
  it always would; small messages skip the scan.

Both ends use it (the SDK for requests and answers, the server for the same in reverse), and
either end also talks to peers that use plain protobuf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from floworacle.v1 import oracle_pb2 as pb

__all__ = [
    "TensorView",
    "Received",
    "Outgoing",
    "parse",
    "parser",
    "serialize",
    "Stub",
    "add_servicer",
    "SCAN_MIN_BYTES",
]

#: Messages shorter than this are parsed by protobuf directly (the copies are cheap there).
SCAN_MIN_BYTES = 32 * 1024

_TENSOR = pb.Tensor.DESCRIPTOR
_DATA = _TENSOR.fields_by_name["data"].number
_LEN = 2  # wire type of length-delimited fields


class _Irregular(Exception):
    """Framing the scan does not handle; protobuf parses the message itself."""


class TensorView:
    """A ``floworacle.v1.Tensor`` whose ``data`` is a read-only memoryview into the received
    message (what the codec reads: ``dtype``, ``shape``, ``data``)."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: int, shape: Any, data: memoryview) -> None:
        self.dtype = dtype
        self.shape = shape
        self.data = data


class Received:
    """A parsed message whose tensor payloads stayed in the received bytes.

    Attribute access is the message's; tensor fields come back as :class:`TensorView`, message
    fields that hold tensors as nested :class:`Received`. :attr:`message` is the plain protobuf
    message with the payloads copied in (for code that needs a real message).
    """

    __slots__ = ("_msg", "_blobs")

    def __init__(self, msg: Message, blobs: dict[str, Any]) -> None:
        self._msg = msg
        self._blobs = blobs

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._msg, name)
        blob = self._blobs.get(name)
        if blob is None or not self._msg.HasField(name):  # (a later oneof member may have won)
            return value
        if isinstance(blob, dict):
            return Received(value, blob)
        return TensorView(value.dtype, value.shape, blob)

    def HasField(self, name: str) -> bool:
        return bool(self._msg.HasField(name))

    @property
    def message(self) -> Message:
        out = type(self._msg)()
        out.CopyFrom(self._msg)
        _fill(out, self._blobs)
        return out

    def __repr__(self) -> str:
        return f"Received({type(self._msg).__name__}, tensors={sorted(self._blobs)})"


def _fill(msg: Message, blobs: dict[str, Any]) -> None:
    for name, blob in blobs.items():
        if not msg.HasField(name):
            continue
        if isinstance(blob, dict):
            _fill(getattr(msg, name), blob)
        else:
            getattr(msg, name).data = bytes(blob)


class Outgoing:
    """A message plus tensor payloads that are appended on the wire instead of copied into it.

    ``message`` is an ordinary protobuf message (set dtype and shape of each tensor there, leave
    ``data`` empty); :meth:`attach` registers the payload of one tensor field, by dotted path
    (``"x_t"``, ``"response.velocity"``). The payload object (a C-contiguous numpy array,
    ``bytes`` or memoryview in the wire byte order) is referenced, not copied, until
    :meth:`serialize`.
    """

    __slots__ = ("message", "_payloads")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._payloads: list[tuple[tuple[int, ...], Any]] = []

    def attach(self, path: str, data: Any) -> None:
        self._payloads.append((_field_numbers(type(self.message).DESCRIPTOR, path), data))

    def put(self, path: str, dtype: int, shape: Any, data: Any) -> None:
        """Set the tensor at ``path`` to ``dtype`` (wire enum) and ``shape``, with payload ``data``."""
        field: Any = self.message
        for name in path.split("."):
            field = getattr(field, name)
        field.dtype = dtype
        del field.shape[:]
        field.shape.extend(int(s) for s in shape)
        field.ClearField("data")
        self.attach(path, data)

    def wrapped(self, outer: Message, field: str) -> Outgoing:
        """This message as field ``field`` of ``outer`` (copied in), payloads carried along."""
        getattr(outer, field).CopyFrom(self.message)
        out = Outgoing(outer)
        prefix = (outer.DESCRIPTOR.fields_by_name[field].number,)
        out._payloads = [(prefix + numbers, data) for numbers, data in self._payloads]
        return out

    def serialize(self) -> bytes:
        parts: list[Any] = [self.message.SerializeToString()]
        offset = len(parts[0])
        for numbers, data in self._payloads:
            view = memoryview(data).cast("B")
            dtype = self._dtype(numbers)
            # Pad so the payload starts ALIGN bytes into the message: the receiver's views of it
            # are then aligned (numpy runs ~10x slower on misaligned float data).
            pad = 0
            for _ in range(4):
                head = _prefix(numbers, view.nbytes, pad, dtype)
                miss = (offset + len(head)) % ALIGN
                if miss == 0:
                    break
                pad += ALIGN - miss
                if pad == 1:  # the smallest padding field is two bytes
                    pad += ALIGN
            parts.append(head)
            parts.append(view)
            offset += len(head) + view.nbytes
        return b"".join(parts)

    def _dtype(self, numbers: tuple[int, ...]) -> int:
        field: Any = self.message
        for number in numbers:
            field = getattr(field, field.DESCRIPTOR.fields_by_number[number].name)
        return int(field.dtype)


def serialize(message: Any) -> bytes:
    """gRPC request/response serializer for :class:`Outgoing`, protobuf messages and bytes."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, Outgoing):
        return message.serialize()
    return bytes(message.SerializeToString())


def parse(cls: Any, raw: bytes, min_bytes: int | None = None) -> Any:
    """Parse ``raw`` as ``cls``: a :class:`Received` when tensor payloads were found, else the
    protobuf message. Malformed input raises protobuf's ``DecodeError`` as ``cls.FromString``.
    Messages shorter than ``min_bytes`` (default :data:`SCAN_MIN_BYTES`) skip the scan."""
    if len(raw) >= (SCAN_MIN_BYTES if min_bytes is None else min_bytes):
        plan = _plan(cls.DESCRIPTOR)
        if plan:
            view = memoryview(raw)
            try:
                stripped, blobs = _split(view, 0, len(view), plan)
            except _Irregular:
                return cls.FromString(raw)
            if blobs:
                return Received(cls.FromString(b"".join(stripped)), blobs)
    return cls.FromString(raw)


def parser(cls: Any) -> Callable[[bytes], Any]:
    """A gRPC deserializer for message class ``cls`` (see :func:`parse`)."""

    def deserialize(raw: bytes) -> Any:
        return parse(cls, raw)

    return deserialize


# -- framing ---------------------------------------------------------------------------------

_PLANS: dict[str, dict[int, tuple[str, Any]]] = {}


def _plan(desc: Any) -> dict[int, tuple[str, Any]]:
    """Field number -> (name, None for a tensor field | the nested plan) for the singular message
    fields of ``desc`` that are tensors or hold tensors; empty when none do."""
    cached = _PLANS.get(desc.full_name)
    if cached is not None:
        return cached
    _PLANS[desc.full_name] = {}  # cycle guard
    plan: dict[int, tuple[str, Any]] = {}
    for f in desc.fields:
        if f.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(f):
            continue
        if f.message_type is _TENSOR:
            plan[f.number] = (f.name, None)
        else:
            sub = _plan(f.message_type)
            if sub:
                plan[f.number] = (f.name, sub)
    _PLANS[desc.full_name] = plan
    return plan


def _is_repeated(f: Any) -> bool:
    return bool(f.is_repeated)


def _field_numbers(desc: Any, path: str) -> tuple[int, ...]:
    numbers = []
    for name in path.split("."):
        f = desc.fields_by_name.get(name)
        if f is None or f.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(f):
            raise ValueError(f"{path!r} is not a path of singular message fields of {desc.full_name}")
        numbers.append(f.number)
        desc = f.message_type
    if desc is not _TENSOR:
        raise ValueError(f"{path!r} does not name a floworacle.v1.Tensor field")
    return tuple(numbers)


#: Payload alignment within a message sent by :class:`Outgoing` (gRPC hands the receiver the
#: message in a buffer at least this aligned, so its views of the payload are aligned too).
ALIGN = 16
_DTYPE = _TENSOR.fields_by_name["dtype"].number


def _prefix(numbers: tuple[int, ...], nbytes: int, pad: int, dtype: int) -> bytes:
    """The bytes before a payload of ``nbytes``: the nested field keys and lengths down to the
    tensor, ``pad`` bytes of padding there, then the ``data`` key and length."""
    head = _padding(pad, dtype) + _key(_DATA) + _varint(nbytes)
    size = len(head) + nbytes  # of the innermost level so far
    for number in reversed(numbers):
        level = _key(number) + _varint(size)
        head = level + head
        size += len(level)
    return head


def _padding(pad: int, dtype: int) -> bytes:
    """``pad`` (0 or >= 2) bytes that change nothing: occurrences of the tensor's ``dtype`` field
    with its own value (the last occurrence wins), each 2 to 11 bytes long through a varint that
    is longer than it needs to be (protobuf parsers accept up to 10 varint bytes)."""
    if not 0 <= dtype < 0x80:  # not one byte: no padding (the receiver copies what is misaligned)
        return b""
    out = bytearray()
    while pad > 0:
        take = min(pad, 11)
        if pad - take == 1:
            take -= 1
        n = take - 1  # bytes of the varint
        value = bytes([dtype]) if n == 1 else bytes([dtype | 0x80] + [0x80] * (n - 2) + [0x00])
        out += _varint(_DTYPE << 3) + value
        pad -= take
    return bytes(out)


def string_field(number: int, value: str) -> bytes:
    """The wire bytes of a string field ``number`` holding ``value``."""
    raw = value.encode()
    return _key(number) + _varint(len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LEN)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Irregular
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields in ``buf[pos:end]``: (start, end of the key, number, body start for
    length-delimited fields else -1, end). Raises :class:`_Irregular` on what it does not handle."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        key_end = pos
        number, wire = key >> 3, key & 7
        body = -1
        if number == 0:
            raise _Irregular
        if wire == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LEN:
            length, body = _read_varint(buf, pos, end)
            pos = body + length
        else:  # groups (deprecated) and invalid wire types
            raise _Irregular
        if pos > end:
            raise _Irregular
        yield start, key_end, number, body, pos


def _split(buf: memoryview, pos: int, end: int, plan: dict[int, tuple[str, Any]]) -> tuple[list[Any], dict[str, Any]]:
    """The fields in ``buf[pos:end]`` with every tensor's ``data`` taken out (as a list of byte
    pieces) and the payloads found, by field name (nested dicts for nested messages)."""
    pieces: list[Any] = []
    blobs: dict[str, Any] = {}
    for start, key_end, number, body, stop in _fields(buf, pos, end):
        entry = plan.get(number) if body >= 0 else None
        if entry is None:
            pieces.append(buf[start:stop])
            continue
        name, sub = entry
        if sub is None:
            inner, data = _split_tensor(buf, body, stop)
            if data is not None:
                blobs[name] = data  # a later occurrence's data replaces an earlier one
        else:
            inner, nested = _split(buf, body, stop, sub)
            if nested:
                merged = blobs.get(name)
                blobs[name] = _merge(merged, nested) if isinstance(merged, dict) else nested
        pieces.append(buf[start:key_end])
        pieces.append(_varint(sum(len(p) for p in inner)))
        pieces.extend(inner)
    return pieces, blobs


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _split_tensor(buf: memoryview, pos: int, end: int) -> tuple[list[Any], memoryview | None]:
    """A Tensor's fields without ``data``, and the last ``data`` payload (None if absent)."""
    pieces: list[Any] = []
    data: memoryview | None = None
    for start, _, number, body, stop in _fields(buf, pos, end):
        if number == _DATA and body >= 0:
            data = buf[body:stop]
        else:
            pieces.append(buf[start:stop])
    return pieces, data


# -- the service over these framings ---------------------------------------------------------

SERVICE = "floworacle.v1.FlowOracle"


def _methods() -> dict[str, tuple[str, Any, Any]]:
    """RPC name -> (grpc kind, request class, response class), from the service descriptor."""
    out = {}
    for m in pb.DESCRIPTOR.services_by_name["FlowOracle"].methods:
        kind = ("stream_" if m.client_streaming else "unary_") + ("stream" if m.server_streaming else "unary")
        out[m.name] = (kind, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
    return out


class Stub:
    """The generated ``FlowOracleStub``'s calls with this module's framing: requests may be
    protobuf messages, :class:`Outgoing` or already serialized bytes; answers are parsed by
    :func:`parse`. Works on ``grpc`` and ``grpc.aio`` channels."""

    def __init__(self, channel: Any) -> None:
        for name, (kind, _, response) in _methods().items():
            call = getattr(channel, kind)(
                f"/{SERVICE}/{name}", request_serializer=serialize, response_deserializer=parser(response)
            )
            setattr(self, name, call)


def add_servicer(servicer: Any, server: Any) -> None:
    """``add_FlowOracleServicer_to_server`` with this module's framing: requests are parsed by
    :func:`parse`, answers may be :class:`Outgoing`. Clients with plain protobuf stubs are
    served alike (the bytes on the wire are standard protobuf both ways)."""
    import grpc

    handlers = {}
    for name, (kind, request, _) in _methods().items():
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handlers[name] = make(
            getattr(servicer, name), request_deserializer=parser(request), response_serializer=serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(SERVICE, handlers)
