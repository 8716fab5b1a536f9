"""Transport security and authentication over real channels: TLS with the SDK, mutual TLS that
refuses clients without a certificate from the configured CA, bearer tokens checked by the server
interceptor (health only on the open health port, reflection closed), token reload, and the same
through `floworacle serve`.

Certificates are made in the test with the ``openssl`` command (EC P-256 keys: fast)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from pydantic import ValidationError
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_oracle

from floworacle import AsyncOracleClient, OracleClient, OracleError, RetryPolicy
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.service import create_server
from floworacle_server.service._auth import TokenAuthInterceptor, read_tokens, server_credentials_from_files
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings, load_settings

# CI installs openssl (deploy/ci-setup.sh); elsewhere these tests fail loudly rather than skip
pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None and os.environ.get("CI") != "true", reason="needs the openssl command"
)

TOKENS = ("tok-alpha-0123456789", "tok-beta-9876543210")


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path

    def read(self, p: Path) -> bytes:
        return p.read_bytes()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
        d / "rogue.crt", d / "rogue.key",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("auth") / "tokens"
    p.write_text(f"# training team\n{TOKENS[0]}\n\n   \n  {TOKENS[1]}  \n# revoked: old-token\n")
    return p


def _query(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.array([0.3, 0.8])
    xt = noisy_queries(x, t, seed=11)
    return xt, t, ref_oracle(x, xt, *linear_coeffs(t))["velocity"]


def _no_retry(**kw: object) -> dict[str, object]:
    return {"retry": RetryPolicy(max_attempts=1), "timeout": 10.0, **kw}


def _rejected(srv, reason: str) -> float:
    v = srv.server.metrics.registry.get_sample_value("floworacle_rejected_requests_total", {"reason": reason})
    return float(v or 0.0)


# -- TLS and mutual TLS --------------------------------------------------------------------------


def test_tls_serves_the_sdk_and_refuses_plaintext(pki: Pki, digits):
    x, _ = digits
    xt, t, ref = _query(x)
    settings = Settings(device="cpu", metrics_port=-1, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    with serve_in_thread(settings) as srv:
        with OracleClient(srv.address, root_certificates=pki.read(pki.ca)) as c:
            assert max_rel(c.velocity(xt.astype(np.float64), t), ref) < 1e-6
        with OracleClient(srv.address, **_no_retry()) as plain, pytest.raises(OracleError) as e:
            plain.datasets()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        # a client that trusts another CA does not accept this server
        with OracleClient(srv.address, root_certificates=pki.read(pki.rogue_cert), **_no_retry()) as wrong:
            with pytest.raises(OracleError) as e2:
                wrong.datasets()
        assert e2.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki, digits):
    x, _ = digits
    xt, t, ref = _query(x)
    settings = Settings(
        device="cpu",
        metrics_port=-1,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )
    root = pki.read(pki.ca)
    with serve_in_thread(settings) as srv:
        with OracleClient(
            srv.address,
            root_certificates=root,
            private_key=pki.read(pki.client_key),
            certificate_chain=pki.read(pki.client_cert),
        ) as c:
            assert max_rel(c.velocity(xt.astype(np.float64), t), ref) < 1e-6
        for kw in (
            {},  # TLS but no client certificate
            {"private_key": pki.read(pki.rogue_key), "certificate_chain": pki.read(pki.rogue_cert)},  # foreign CA
        ):
            with OracleClient(srv.address, root_certificates=root, **_no_retry(**kw)) as c2:
                with pytest.raises(OracleError) as e:
                    c2.datasets()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, kw


def test_tls_settings_are_checked_before_data_loads(pki: Pki, tmp_path: Path):
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        Settings(tls_cert=str(pki.server_cert))
    with pytest.raises(ValueError, match="mutual TLS"):
        Settings(tls_client_ca=str(pki.ca))
    with pytest.raises(ValueError, match="cannot read the TLS key"):
        server_credentials_from_files(str(pki.server_cert), str(tmp_path / "missing.key"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not PEM"):
        server_credentials_from_files(str(tmp_path / "junk.pem"), str(pki.server_key))
    env = {
        "FLOWORACLE_TLS_CERT": "/c.pem",
        "FLOWORACLE_TLS_KEY": "/k.pem",
        "FLOWORACLE_TLS_CLIENT_CA": "/ca.pem",
        "FLOWORACLE_AUTH_TOKENS_FILE": "/t",
        "FLOWORACLE_MAX_INFLIGHT_ROWS": "123",
    }
    s = load_settings(None, env=env)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca, s.auth_tokens_file) == ("/c.pem", "/k.pem", "/ca.pem", "/t")
    assert s.max_inflight_rows == 123 and s.reflection is False  # auth on: reflection off by default
    assert load_settings({"reflection": True}, env=env).reflection is True
    assert Settings().reflection is True


# -- bearer tokens -------------------------------------------------------------------------------


def test_read_tokens_skips_comments_and_blanks(tokens_file: Path, tmp_path: Path):
    assert read_tokens(tokens_file) == TOKENS
    (tmp_path / "empty").write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_tokens(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        read_tokens(tmp_path / "absent")


@pytest.fixture(scope="module")
def auth_server(tokens_file: Path) -> Iterator:
    with serve_in_thread(Settings(device="cpu", auth_tokens_file=str(tokens_file), max_queue_delay_ms=1.0)) as srv:
        yield srv


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_missing_wrong_or_malformed_token_is_unauthenticated(auth_server, digits):
    x, _ = digits
    xt, t, _ = _query(x)
    req = oracle_request(xt, t)
    before = _rejected(auth_server, "unauthenticated")
    with grpc.insecure_channel(auth_server.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        cases = [
            (None, "requires authentication"),
            (_md("tok-alpha-012345678"), "not accepted"),  # a prefix of a real token
            (_md(TOKENS[0] + "x"), "not accepted"),
            ((("authorization", f"Basic {TOKENS[0]}"),), "Bearer <token>"),
            ((("authorization", "Bearer "),), "Bearer <token>"),
        ]
        for md, text in cases:
            with pytest.raises(grpc.RpcError) as e:
                stub.Oracle(req, metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
            assert text in e.value.details(), (md, e.value.details())
        # streaming and listing methods are closed too
        with pytest.raises(grpc.RpcError) as e:
            list(stub.OracleStream(iter([req]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.ListDatasets(pb.ListDatasetsRequest(), metadata=_md("nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _rejected(auth_server, "unauthenticated") == before + 7
    with OracleClient(auth_server.address, token="wrong", **_no_retry()) as c, pytest.raises(OracleError) as e2:
        c.velocity(xt, t)
    assert e2.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_is_served_exactly_and_health_needs_it_on_the_grpc_port(auth_server, digits):
    x, _ = digits
    xt, t, ref = _query(x)
    for token in TOKENS:
        with OracleClient(auth_server.address, token=token) as c:
            assert max_rel(c.velocity(xt.astype(np.float64), t), ref) < 1e-6
            assert [d.name for d in c.datasets()] == ["digits"]
    with grpc.insecure_channel(auth_server.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        answers = list(stub.OracleStream(iter([oracle_request(xt, t, dtype="float64")]), metadata=_md(TOKENS[1])))
        assert len(answers) == 1 and answers[0].HasField("response")
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "floworacle.v1.FlowOracle", "floworacle.v1.FlowOracle/digits"):
            request = health_pb2.HealthCheckRequest(service=name)
            status = health.Check(request, metadata=_md(TOKENS[0]), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            # open health checks live on health_port: here a stranger's is refused before it is read
            with pytest.raises(grpc.RpcError) as e:
                health.Check(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # an authenticated caller is told which names exist
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), metadata=_md(TOKENS[0]), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "floworacle.v1.FlowOracle/digits" in e.value.details()


def test_a_tls_key_of_another_certificate_is_named(pki: Pki, tmp_path: Path):
    with pytest.raises(ValueError, match=r"does not belong to the certificate .*server\.crt"):
        server_credentials_from_files(str(pki.server_cert), str(pki.client_key))
    settings = Settings(device="cpu", metrics_port=-1, tls_cert=str(pki.server_cert), tls_key=str(pki.rogue_key))
    with pytest.raises(ValueError, match="does not belong"):
        create_server(settings)  # before any data loads, instead of "cannot bind ... in use?" at start
    encrypted = tmp_path / "encrypted.key"
    _openssl("ec", "-in", str(pki.server_key), "-aes256", "-passout", "pass:x", "-out", str(encrypted), cwd=tmp_path)
    with pytest.raises(ValueError, match="is encrypted"):
        server_credentials_from_files(str(pki.server_cert), str(encrypted))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "does not belong to the certificate" in text and "Traceback" not in text
    assert "in use" not in text


async def test_async_client_with_tls_and_token(pki: Pki, tokens_file: Path, digits):
    x, _ = digits
    xt, t, ref = _query(x)
    settings = Settings(
        device="cpu",
        metrics_port=-1,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        auth_tokens_file=str(tokens_file),
    )
    with serve_in_thread(settings) as srv:
        root = pki.read(pki.ca)
        async with AsyncOracleClient(srv.address, root_certificates=root, token=TOKENS[1]) as c:
            assert max_rel(await c.velocity(xt.astype(np.float64), t), ref) < 1e-6
            answers = [a async for a in c.velocity_stream([(xt.astype(np.float64), t)])]
            assert max_rel(answers[0], ref) < 1e-6
        async with AsyncOracleClient(srv.address, root_certificates=root, **_no_retry()) as c:
            with pytest.raises(OracleError) as e:
                await c.velocity(xt, t)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in str(e.value)


def test_reflection_is_off_with_auth_unless_enabled(auth_server, tokens_file: Path):
    with grpc.insecure_channel(auth_server.address) as ch:
        authed = grpc.intercept_channel(ch, _AddMetadata(_md(TOKENS[0])))
        with pytest.raises(grpc.RpcError) as e:
            ProtoReflectionDescriptorDatabase(authed).get_services()
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as e:
            ProtoReflectionDescriptorDatabase(ch).get_services()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    settings = Settings(device="cpu", metrics_port=-1, auth_tokens_file=str(tokens_file), reflection=True)
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        with pytest.raises(grpc.RpcError) as e:  # enabled, but still behind the token
            ProtoReflectionDescriptorDatabase(ch).get_services()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        services = ProtoReflectionDescriptorDatabase(
            grpc.intercept_channel(ch, _AddMetadata(_md(TOKENS[0])))
        ).get_services()
        assert "floworacle.v1.FlowOracle" in services


def test_token_reload_replaces_the_accepted_set(tmp_path: Path):
    f = tmp_path / "tokens"
    f.write_text("first-token\n")
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, auth_tokens_file=str(f))) as srv:
        auth = srv.server.auth
        assert isinstance(auth, TokenAuthInterceptor) and auth.token_count == 1
        with OracleClient(srv.address, token="first-token") as c:
            c.datasets()
        f.write_text("second-token\n")
        assert auth.reload() == 1
        with OracleClient(srv.address, token="first-token", **_no_retry()) as c, pytest.raises(OracleError) as e:
            c.datasets()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with OracleClient(srv.address, token="second-token") as c:
            c.datasets()
        f.write_text("# emptied by mistake\n")
        with pytest.raises(ValueError, match="holds no token"):
            auth.reload()
        with OracleClient(srv.address, token="second-token") as c:  # the previous set stays
            c.datasets()


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata to every call (reflection's client takes no metadata argument)."""

    def __init__(self, md: tuple[tuple[str, str], ...]) -> None:
        self.md = md

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_Details(client_call_details, self.md), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(_Details(client_call_details, self.md), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, md) -> None:
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = tuple(d.metadata or ()) + tuple(md)
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


# -- the same through `floworacle serve` -----------------------------------------------------------


def test_serve_command_with_tls_tokens_and_sighup_reload(pki: Pki, tmp_path: Path, digits):
    x, _ = digits
    xt, t, ref = _query(x)
    tokens = tmp_path / "tokens"
    tokens.write_text("cli-token-1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    env["FLOWORACLE_AUTH_TOKENS_FILE"] = str(tokens)  # from the environment, the rest from flags
    cmd = [
        sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
        "--host", "127.0.0.1", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        port, lines = _wait_port(proc)
        assert port, "".join(lines)
        assert "token authentication on: 1 tokens" in "".join(lines)
        tls = {
            "root_certificates": pki.read(pki.ca),
            "private_key": pki.read(pki.client_key),
            "certificate_chain": pki.read(pki.client_cert),
        }
        addr = f"127.0.0.1:{port}"
        with OracleClient(addr, token="cli-token-1", **tls) as c:
            assert max_rel(c.velocity(xt.astype(np.float64), t), ref) < 1e-6
        tokens.write_text("cli-token-2\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        accepted = False
        while not accepted and time.monotonic() < deadline:  # the reload happens on the server's loop
            with OracleClient(addr, token="cli-token-2", **_no_retry(**tls)) as c:
                try:
                    c.datasets()
                    accepted = True
                except OracleError as exc:
                    assert exc.code == grpc.StatusCode.UNAUTHENTICATED
                    time.sleep(0.05)
        assert accepted
        with OracleClient(addr, token="cli-token-1", **_no_retry(**tls)) as c, pytest.raises(OracleError) as e:
            c.datasets()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "SIGHUP: 1 tokens loaded" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_refuses_an_empty_tokens_file(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("\n# none\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--auth-tokens-file", str(tokens)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "holds no token" in out.stdout + out.stderr


def _wait_port(proc: subprocess.Popen) -> tuple[int | None, list[str]]:
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if m:
            # the auth line follows the serving line
            lines.append(proc.stdout.readline())
            return int(m.group(1)), lines
    return None, lines


# -- round two: unauthenticated load, revocation of open streams, SIGHUP ----------------------------


def _vm_kib(pid: int, field: str) -> int:
    """VmRSS / VmHWM (peak resident set) of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_an_unauthenticated_200_mib_request_is_refused_before_it_is_read(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("big-token\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--host", "127.0.0.1", "--auth-tokens-file", str(tokens)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        port, lines = _wait_port(proc)
        assert port, "".join(lines)
        rows = (200 << 20) // (64 * 4)
        payload = pb.OracleRequest(
            x_t=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[rows, 64], data=bytes(rows * 64 * 4)),
            t=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[rows], data=bytes(rows * 8)),
        ).SerializeToString()
        assert len(payload) > 200 << 20
        before = _vm_kib(proc.pid, "VmHWM")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
            call = ch.unary_unary("/floworacle.v1.FlowOracle/Oracle")
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call(payload, timeout=60)
            took = time.monotonic() - start
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # the server goes on answering authenticated calls
            ok = pb_grpc.FlowOracleStub(ch).ListDatasets(
                pb.ListDatasetsRequest(), metadata=(("authorization", "Bearer big-token"),), timeout=10
            )
            assert [d.name for d in ok.datasets] == ["digits"]
        rise_mib = (_vm_kib(proc.pid, "VmHWM") - before) / 1024
        assert rise_mib < 64, f"the server's peak RSS rose {rise_mib:.0f} MiB for a refused 200 MiB request"
        assert took < 10
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_huge_health_checks_cost_the_server_nothing(tmp_path: Path):
    """Four concurrent 200 MiB health checks without a token: on the gRPC port they are refused
    before they are read (health needs a token there when tokens are on), on the open health port
    gRPC refuses them from their length prefix (4 KiB limit). Before, the open health service read
    them (up to max_message_bytes): the server's RSS rose by 4.4 GiB."""
    tokens = tmp_path / "tokens"
    tokens.write_text("health-token\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--host", "127.0.0.1", "--auth-tokens-file", str(tokens), "--health-port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        port, lines = _wait_port(proc)
        assert port, "".join(lines)
        found = re.search(r"open health checks on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert found, "".join(lines)
        health_port = int(found.group(1))
        huge = health_pb2.HealthCheckRequest(service="x" * (200 << 20)).SerializeToString()
        padded = (
            health_pb2.HealthCheckRequest(service="").SerializeToString()
            + b"\x9a\x06"
            + bytes([0x80, 0x80, 0x80, 0x64])
            + bytes(200 << 20)
        )
        opts = [("grpc.max_send_message_length", -1)]
        before = _vm_kib(proc.pid, "VmHWM")
        codes: dict[int, set[grpc.StatusCode]] = {port: set(), health_port: set()}
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as main,
            grpc.insecure_channel(f"127.0.0.1:{health_port}", options=opts) as open_,
        ):

            def check(ch: grpc.Channel, p: int, payload: bytes) -> None:
                try:
                    ch.unary_unary("/grpc.health.v1.Health/Check")(payload, timeout=60)
                except grpc.RpcError as exc:
                    codes[p].add(exc.code())

            threads = [
                threading.Thread(target=check, args=(ch, p, payload))
                for ch, p in ((main, port), (open_, health_port))
                for payload in (huge, padded, huge, padded)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            rise_mib = (_vm_kib(proc.pid, "VmHWM") - before) / 1024
            assert codes == {port: {grpc.StatusCode.UNAUTHENTICATED}, health_port: {grpc.StatusCode.RESOURCE_EXHAUSTED}}
            assert rise_mib < 64, f"the server's peak RSS rose {rise_mib:.0f} MiB for eight refused 200 MiB checks"
            stub = health_pb2_grpc.HealthStub(open_)
            for name in ("", "floworacle.v1.FlowOracle", "floworacle.v1.FlowOracle/digits"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # an unknown name: NOT_FOUND that lists no data set to a stranger and echoes a bounded name
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(service="y" * 3000), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "digits" not in e.value.details() and len(e.value.details()) < 400, e.value.details()
            assert "3000 characters" in e.value.details()
    finally:
        proc.kill()
        proc.wait()


def test_revoking_a_token_ends_the_streams_opened_with_it(tmp_path: Path, digits):
    x, _ = digits
    xt, t, ref = _query(x)
    f = tmp_path / "tokens"
    f.write_text("keep-token\nrevoke-token\n")
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, auth_tokens_file=str(f))) as srv:
        auth = srv.server.auth
        assert auth is not None
        with (
            OracleClient(srv.address, token="revoke-token") as doomed,
            OracleClient(srv.address, token="keep-token") as kept,
        ):
            go = threading.Event()

            def items(n: int):
                for i in range(n):
                    if i == 2:
                        go.wait(10)  # the token is revoked between the 2nd and 3rd message
                    yield xt, t

            answers: list[object] = []
            survivors: list[object] = []
            worker = threading.Thread(target=_drain, args=(doomed.velocity_stream(items(5)), answers))
            keeper = threading.Thread(target=_drain, args=(kept.velocity_stream(items(5)), survivors))
            worker.start()
            keeper.start()
            deadline = time.monotonic() + 20
            while (len(answers) < 2 or len(survivors) < 2) and time.monotonic() < deadline:
                time.sleep(0.02)
            f.write_text("keep-token\n")
            assert auth.reload() == 1
            go.set()
            worker.join(20)
            keeper.join(20)
        assert len(answers) == 3 and isinstance(answers[-1], OracleError), answers
        assert answers[-1].code == grpc.StatusCode.UNAUTHENTICATED and "not accepted" in answers[-1].details
        assert all(max_rel(a, ref) < 1e-6 for a in answers[:2])
        assert len(survivors) == 5 and all(max_rel(a, ref) < 1e-6 for a in survivors)  # another token's stream goes on


def _drain(it, into: list) -> None:
    try:
        for a in it:
            into.append(a)
    except OracleError as exc:
        into.append(exc)


def test_sighup_without_tokens_is_logged_and_ignored(digits):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--host", "127.0.0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        port = None
        while port is None and (line := proc.stdout.readline()):  # no auth line follows here
            lines.append(line)
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None  # still running
        with OracleClient(f"127.0.0.1:{port}") as c:
            assert [d.name for d in c.datasets()] == ["digits"]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "SIGHUP: nothing to reload" in rest and "draining" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_follow_the_grpc_host_and_can_require_tls_and_a_token(pki: Pki, tokens_file: Path, capfd):
    import http.client
    import ssl
    import urllib.request

    with serve_in_thread(Settings(device="cpu", host="127.0.0.1", metrics_port=0)) as srv:
        assert srv.server.metrics._http is not None
        assert srv.server.metrics._http.server_address[0] == "127.0.0.1"  # not 0.0.0.0
    settings = Settings(
        device="cpu", host="127.0.0.1", metrics_port=0, metrics_tls=True, metrics_auth=True,
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), auth_tokens_file=str(tokens_file),
    )  # fmt: skip
    with serve_in_thread(settings) as srv:
        url = f"https://127.0.0.1:{srv.server.metrics_port}/metrics"
        ctx = ssl.create_default_context(cafile=str(pki.ca))

        def get(token: str | None) -> tuple[int, str]:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, body = get(TOKENS[1])
        assert status == 200 and "floworacle_requests_total" in body
        assert get(None) == (401, get(None)[1]) and "requires authentication" in get(None)[1]
        assert get("wrong-token")[0] == 401
        capfd.readouterr()
        for _ in range(3):
            plain = http.client.HTTPConnection("127.0.0.1", srv.server.metrics_port, timeout=5)
            with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
                plain.request("GET", "/metrics")
                plain.getresponse().read()
        assert get(TOKENS[1])[0] == 200  # and the endpoint goes on
        # a plaintext request to the HTTPS port is the client's mistake: no traceback in the log
        logged = capfd.readouterr()
        assert "Traceback" not in logged.err + logged.out, logged.err
    with pytest.raises(ValidationError, match="metrics_tls"):
        Settings(metrics_tls=True)
    with pytest.raises(ValidationError, match="metrics_auth"):
        Settings(metrics_auth=True)
