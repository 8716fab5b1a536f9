"""Test tools at the protobuf wire level: a field splitter and writer for hand-made (mutated)
framings, and a recording proxy that captures the exact bytes each side puts on the wire.

Only tests use this; the project itself sends and reads messages with protobuf's own code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

SERVICE = "floworacle.v1.FlowOracle"


def varint(n: int, length: int | None = None) -> bytes:
    """``n`` as a varint; with ``length`` padded to that many bytes (non-minimal, which protobuf
    accepts up to 10 bytes)."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    if length is not None and length > len(out):
        out[-1] |= 0x80
        out += b"\x80" * (length - len(out) - 1) + b"\x00"
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


@dataclass
class Field:
    """One field occurrence: number, wire type and its raw value bytes (the varint, the 4 / 8
    fixed bytes, or the body of a length-delimited field)."""

    number: int
    wire: int
    value: bytes

    def encode(self, key_len: int | None = None, len_len: int | None = None) -> bytes:
        key = varint(self.number << 3 | self.wire, key_len)
        if self.wire == 2:
            return key + varint(len(self.value), len_len) + self.value
        return key + self.value


def split(buf: bytes) -> list[Field]:
    """The top-level fields of a well-formed message."""
    out = []
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            start = pos
            _, pos = read_varint(buf, pos)
            out.append(Field(number, wire, buf[start:pos]))
        elif wire == 1:
            out.append(Field(number, wire, buf[pos : pos + 8]))
            pos += 8
        elif wire == 5:
            out.append(Field(number, wire, buf[pos : pos + 4]))
            pos += 4
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            out.append(Field(number, wire, buf[pos : pos + n]))
            pos += n
        else:
            raise ValueError(f"wire type {wire}")
    return out


def join(fields: list[Field]) -> bytes:
    return b"".join(f.encode() for f in fields)


# -- recording proxy ------------------------------------------------------------------------------


@dataclass
class Recording:
    """What crossed the proxy, per method: the request and response messages as raw bytes."""

    requests: dict[str, list[bytes]] = field(default_factory=dict)
    responses: dict[str, list[bytes]] = field(default_factory=dict)

    def clear(self) -> None:
        self.requests.clear()
        self.responses.clear()


def _identity(b: bytes) -> bytes:
    return b


@contextmanager
def recording_proxy(target: str, methods: dict[str, str]) -> Iterator[tuple[str, Recording]]:
    """A grpc.aio server on 127.0.0.1 that forwards ``/floworacle.v1.FlowOracle/<method>`` to
    ``target`` byte for byte (no protobuf on either side) and records every message both ways.
    ``methods``: method name -> "unary" or "stream" (bidirectional)."""
    rec = Recording()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: dict[str, Any] = {}
    box: dict[str, Any] = {}

    async def main() -> None:
        channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 30)])
        handlers = {}
        for name, kind in methods.items():
            path = f"/{SERVICE}/{name}"
            if kind == "unary":
                call = channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)

                async def unary(
                    raw: bytes, context: grpc.aio.ServicerContext, call: Any = call, name: str = name
                ) -> bytes:
                    rec.requests.setdefault(name, []).append(raw)
                    try:
                        out: bytes = await call(raw, metadata=context.invocation_metadata())
                    except grpc.aio.AioRpcError as exc:
                        await context.abort(exc.code(), exc.details() or "")
                    rec.responses.setdefault(name, []).append(out)
                    return out

                handlers[name] = grpc.unary_unary_rpc_method_handler(unary)
            else:
                scall = channel.stream_stream(path, request_serializer=_identity, response_deserializer=_identity)

                async def stream(
                    raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext, scall: Any = scall, name: str = name
                ) -> AsyncIterator[bytes]:
                    async def forward() -> AsyncIterator[bytes]:
                        async for raw in raws:
                            rec.requests.setdefault(name, []).append(raw)
                            yield raw

                    async for out in scall(forward(), metadata=context.invocation_metadata()):
                        rec.responses.setdefault(name, []).append(out)
                        yield out

                handlers[name] = grpc.stream_stream_rpc_method_handler(stream)
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop["event"] = asyncio.Event()
        ready.set()
        await stop["event"].wait()
        await server.stop(0)
        await channel.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the recording proxy did not start")
    try:
        yield f"127.0.0.1:{box['port']}", rec
    finally:
        loop.call_soon_threadsafe(stop["event"].set)
        thread.join(10)
        loop.close()
