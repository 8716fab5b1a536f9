"""Transport behaviour over real channels: auto-split, retries (UNAVAILABLE, RESOURCE_EXHAUSTED
with a retry hint), deadlines, round robin over two servers, bearer token, TLS."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sdk_support import Data, linear_ref, make_store, queries, settings

from floworacle import AsyncOracleClient, OracleClient, OracleError, RetryPolicy
from floworacle.v1 import oracle_pb2 as pb
from floworacle_server.service.testing import RunningServer, serve_in_thread


class Faults(grpc.aio.ServerInterceptor):
    """Fails the next ``count`` Oracle calls with ``code`` (and trailing metadata), or delays
    every call by ``delay`` seconds; records the metadata of every call."""

    def __init__(self) -> None:
        self.count = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.delay = 0.0
        self.failed = 0
        self.metadata: list[dict[str, str]] = []

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.metadata.append(dict(details.invocation_metadata or ()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if details.method.endswith("/Oracle") and self.count > 0:
            self.count -= 1
            self.failed += 1
            code, trailing = self.code, self.trailing

            async def fail(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(code, "injected failure", trailing_metadata=trailing)

            return grpc.unary_unary_rpc_method_handler(
                fail,
                request_deserializer=pb.OracleRequest.FromString,
                response_serializer=pb.OracleResponse.SerializeToString,
            )
        return await continuation(details)


@pytest.fixture(scope="module")
def faulty(data: Data) -> Iterator[tuple[RunningServer, Faults]]:
    faults = Faults()
    with serve_in_thread(settings(), make_store(data), interceptors=(faults,)) as srv:
        yield srv, faults


@pytest.fixture
def faults(faulty: tuple[RunningServer, Faults]) -> Iterator[Faults]:
    f = faulty[1]
    yield f
    f.count, f.delay, f.trailing, f.code = 0, 0.0, (), grpc.StatusCode.UNAVAILABLE


class CountCalls(grpc.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.rows: list[int] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        # the SDK hands interceptors the request message (the generated stub serializes it)
        if details.method.endswith("/Oracle"):
            self.rows.append(int(request.x_t.shape[0]))
        return continuation(details, request)


# -- auto-split ------------------------------------------------------------------------------

LIMIT = 16 * 1024


def test_split_batch_equals_unsplit(server: RunningServer, data: Data) -> None:
    x_t, t = queries(data, 96, seed=20)
    with OracleClient(server.address) as c:
        whole = c.predict(x_t, t, top_k=4)
    counter = CountCalls()
    with (
        serve_in_thread(settings(max_message_bytes=LIMIT), make_store(data)) as small,
        OracleClient(small.address, max_message_bytes=LIMIT, interceptors=[counter]) as c,
    ):
        parts = c.predict(x_t, t, top_k=4)
        # the same batch in one message is over the server's limit
        with OracleClient(small.address) as big, pytest.raises(OracleError) as e:
            big.predict(x_t, t, top_k=4)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(counter.rows) > 1 and sum(counter.rows) == 96
    np.testing.assert_array_equal(parts.topk_indices, whole.topk_indices)
    for name in ("velocity", "x1_hat", "eps_hat", "score", "topk_weights", "entropy", "ess"):
        # equal up to float64 rounding (the engine's summation order depends on the batch)
        np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), rtol=1e-12, atol=1e-13, err_msg=name)
    assert parts.fingerprint == whole.fingerprint
    np.testing.assert_allclose(parts.velocity, linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)


def test_split_by_rows_and_nearest(server: RunningServer, data: Data) -> None:
    x_t, t = queries(data, 23, seed=21)
    counter = CountCalls()
    with OracleClient(server.address, max_request_rows=5, interceptors=[counter]) as c:
        u = c.velocity(x_t, t)
        nb = c.nearest(x_t, 2)
    assert counter.rows == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(u, linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)
    d = np.linalg.norm(x_t[:, None, :] - data.x[None], axis=-1)
    np.testing.assert_array_equal(nb.indices, np.argsort(d, axis=1)[:, :2])


def test_row_too_big_for_limit_is_a_value_error(server: RunningServer, data: Data) -> None:
    with OracleClient(server.address, max_message_bytes=4096) as c, pytest.raises(ValueError, match="message limit"):
        c.velocity(np.zeros((2, 4096)), 0.5)


# -- retries ---------------------------------------------------------------------------------


def test_retries_unavailable(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    srv = faulty[0]
    x_t, t = queries(data, 4, seed=22)
    faults.count = 2
    with OracleClient(srv.address, retry=RetryPolicy(max_attempts=4, initial_backoff=0.01), seed=0) as c:
        u = c.velocity(x_t, t)
    assert faults.failed >= 2 and faults.count == 0
    np.testing.assert_allclose(u, linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)


def test_retries_cancelled_from_the_server(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    # what gRPC core answers for a call that a draining server had not handed to a handler
    x_t, t = queries(data, 3, seed=26)
    faults.count, faults.code = 2, grpc.StatusCode.CANCELLED
    with OracleClient(faulty[0].address, retry=RetryPolicy(initial_backoff=0.01)) as c:
        u = c.velocity(x_t, t, timeout=10)
    assert faults.failed >= 2 and faults.count == 0
    np.testing.assert_allclose(u, linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)


def test_close_ends_a_call_without_retrying_it(
    faulty: tuple[RunningServer, Faults], faults: Faults, data: Data
) -> None:
    x_t, t = queries(data, 2, seed=27)
    faults.delay = 1.0
    c = OracleClient(faulty[0].address)
    c.velocity(x_t, t)  # connected
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            c.velocity(x_t, t, timeout=30)
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.3)
    start = time.monotonic()
    c.close()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - start < 5
    assert len(outcome) == 1 and isinstance(outcome[0], OracleError), outcome
    assert outcome[0].code == grpc.StatusCode.CANCELLED


def test_no_retry_when_attempts_used_up(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    x_t, t = queries(data, 2, seed=23)
    faults.count = 3
    with OracleClient(faulty[0].address, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as c:
        with pytest.raises(OracleError) as e:
            c.velocity(x_t, t)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "injected" in e.value.details
    assert faults.count == 1  # exactly two attempts


def test_resource_exhausted_honours_retry_hint(
    faulty: tuple[RunningServer, Faults], faults: Faults, data: Data
) -> None:
    x_t, t = queries(data, 2, seed=24)
    faults.count, faults.code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    faults.trailing = (("grpc-retry-pushback-ms", "300"),)
    with OracleClient(faulty[0].address, retry=RetryPolicy(initial_backoff=0.001)) as c:
        start = time.monotonic()
        c.velocity(x_t, t)
        assert time.monotonic() - start >= 0.3
        # without a hint RESOURCE_EXHAUSTED is final (e.g. a message over the limit)
        faults.count, faults.trailing = 1, ()
        with pytest.raises(OracleError) as e:
            c.velocity(x_t, t)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.retry_after is None


def test_retry_moves_to_the_next_address(server: RunningServer, data: Data) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    x_t, t = queries(data, 3, seed=25)
    with OracleClient([dead, server.address], retry=RetryPolicy(initial_backoff=0.01)) as c:
        for _ in range(3):
            np.testing.assert_allclose(c.velocity(x_t, t), linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)


# -- deadlines -------------------------------------------------------------------------------


def test_deadline_exceeded(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    x_t, t = queries(data, 2, seed=26)
    faults.delay = 1.0
    with OracleClient(faulty[0].address) as c:
        start = time.monotonic()
        with pytest.raises(OracleError) as e:
            c.velocity(x_t, t, timeout=0.2)
        took = time.monotonic() - start
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 0.9


def test_deadline_exceeded_says_so(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    """A connected server that is slow gets the plain deadline message, not "no server answered"."""
    x_t, t = queries(data, 2, seed=28)
    with OracleClient(faulty[0].address) as c:
        c.velocity(x_t, t)  # connected
        faults.delay = 1.0
        with pytest.raises(OracleError) as e:
            c.velocity(x_t, t, timeout=0.3)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no server answered" not in e.value.details


def test_a_silent_listener_is_reported_as_no_server(data: Data) -> None:
    """A port that accepts TCP but never speaks HTTP/2 (a wrong service, a hung process): the
    call's final error names the address and says that no server answered there."""
    x_t, t = queries(data, 2, seed=29)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody reads or writes
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with OracleClient(address, timeout=0.5) as c:
            with pytest.raises(OracleError) as e:
                c.velocity(x_t, t)

        async def main() -> OracleError:
            async with AsyncOracleClient(address, timeout=0.5) as ac:
                with pytest.raises(OracleError) as ae:
                    await ac.velocity(x_t, t)
            return ae.value

        aerr = asyncio.run(main())
    for err in (e.value, aerr):  # gRPC's own words last: "...timed out before receiving SETTINGS frame"
        assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert f"no server answered at {address} within the call's deadline (0.5 s)" in err.details, err.details
        assert "gRPC says:" in err.details


def test_retries_stop_at_the_deadline(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    x_t, t = queries(data, 2, seed=27)
    faults.count = 10_000
    policy = RetryPolicy(max_attempts=10_000, initial_backoff=0.02, max_backoff=0.05)
    with OracleClient(faulty[0].address, retry=policy, timeout=0.5) as c:
        start = time.monotonic()
        with pytest.raises(OracleError) as e:
            c.velocity(x_t, t)
        took = time.monotonic() - start
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 0.3 < took < 1.5
    assert faults.failed > 3


# -- balancing, metadata, TLS ----------------------------------------------------------------


def test_round_robin_over_two_servers(data: Data) -> None:
    x_t, t = queries(data, 2, seed=28)
    with (
        serve_in_thread(settings(), make_store(data)) as a,
        serve_in_thread(settings(), make_store(data)) as b,
    ):
        # a list, a comma string and a URI: each one channel whose calls gRPC's own round_robin
        # policy spreads over both servers (no balancing in the SDK)
        for target in ([a.address, b.address], f"{a.address},{b.address}", f"ipv4:{a.address},{b.address}"):
            before = (a.server.batcher.engine_calls, b.server.batcher.engine_calls)
            with OracleClient(target) as c:
                c.datasets()  # connect
                time.sleep(0.2)  # both subchannels ready
                for _ in range(8):
                    c.velocity(x_t, t)
            got = (a.server.batcher.engine_calls - before[0], b.server.batcher.engine_calls - before[1])
            assert sum(got) == 8 and min(got) >= 3, (target, got)


def test_dns_target(server: RunningServer, data: Data) -> None:
    x_t, t = queries(data, 2, seed=29)
    with OracleClient(f"dns:///{server.address}") as c:
        assert c.velocity(x_t, t).shape == x_t.shape


def test_bearer_token_is_sent(faulty: tuple[RunningServer, Faults], faults: Faults, data: Data) -> None:
    faults.metadata.clear()
    with OracleClient(faulty[0].address, token="s3cret") as c:
        c.datasets()
    assert faults.metadata[-1].get("authorization") == "Bearer s3cret"
    with pytest.raises(ValueError, match="line breaks"):
        OracleClient(faulty[0].address, token="a\nb")


def _self_signed(tmp: Path) -> tuple[bytes, bytes]:
    key, crt = tmp / "k.pem", tmp / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key.read_bytes(), crt.read_bytes()


@pytest.mark.skipif(
    shutil.which("openssl") is None and os.environ.get("CI") != "true",
    reason="needs the openssl command to make a certificate (CI installs it)",
)
def test_tls(tmp_path: Path, data: Data) -> None:
    key, crt = _self_signed(tmp_path)
    creds = grpc.ssl_server_credentials([(key, crt)])
    x_t, t = queries(data, 2, seed=30)
    with serve_in_thread(settings(), make_store(data), server_credentials=creds) as srv:
        with OracleClient(srv.address, root_certificates=crt) as c:
            np.testing.assert_allclose(c.velocity(x_t, t), linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)
        with OracleClient(srv.address, retry=RetryPolicy(max_attempts=1), timeout=5) as plain:
            with pytest.raises(OracleError) as e:
                plain.datasets()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
