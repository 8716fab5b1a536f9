"""gRPC message limits, request limits and channel options: the one place both the SDK and the
server take them from."""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_REQUEST_ROWS",
    "MAX_CONCURRENT_STREAMS",
    "MAX_TOP_K",
    "MESSAGE_OVERHEAD",
    "STREAM_WINDOW_BYTES",
    "channel_options",
    "server_options",
]

#: Largest k of top-k diagnostics and of nearest-sample queries (at most N as well).
MAX_TOP_K = 1024
#: Rows one request may carry by default (the server's ``max_request_rows``; the SDK splits
#: larger batches into several requests).
DEFAULT_MAX_REQUEST_ROWS = 16384
#: Headroom per message for names, fingerprints, ids and the protobuf framing of ~16 tensors.
MESSAGE_OVERHEAD = 4096

#: Large enough for a B = 1,024 x D = 8,192 float32 request (32 MiB) and a response carrying
#: four outputs of that size plus diagnostics. The SDK splits bigger batches automatically.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

#: Streams (calls) one connection may have open at once on the server (HTTP/2
#: SETTINGS_MAX_CONCURRENT_STREAMS; 100 is the protocol's recommended floor).
MAX_CONCURRENT_STREAMS = 256

#: The server's HTTP/2 receive window per stream: what gRPC itself buffers of a stream's request
#: bytes that the server has not asked for (a stream waiting for the server's byte budget, or one
#: whose client never reads its answers). Fixed: with BDP probing gRPC grows it to the measured
#: bandwidth-delay product (several MB a stream on loopback), outside any budget. A message the
#: server does read still arrives at full speed: gRPC opens the window to the whole message then.
STREAM_WINDOW_BYTES = 64 * 1024


def _common(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes <= 0 or max_message_bytes > 2**31 - 1:
        raise ValueError(f"max_message_bytes must be in 1..2**31-1, got {max_message_bytes}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Options for client channels: message limits and keepalive that survives idle trainers."""
    return [
        *_common(max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # the SDK retries itself, with backoff and deadlines
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Options for the server: the same limits, permission for the clients' keepalive pings, at
    most MAX_CONCURRENT_STREAMS streams per connection (a client's further calls wait for a free
    stream, they do not fail), and a fixed receive window of STREAM_WINDOW_BYTES per stream (BDP
    probing off), so that what gRPC buffers of unread request bytes is at most that per call; the
    server caps its concurrent calls so that the windows together fit its byte budget."""
    return [
        *_common(max_message_bytes),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ]
