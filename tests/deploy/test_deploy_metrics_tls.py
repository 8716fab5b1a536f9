"""The metrics-tls component against real systems. Its exec probe, run exactly as the built manifest
says (paths mapped to files made here), checks a real TLS server's health; and a real Prometheus,
configured from the built ServiceMonitor endpoint the way the Prometheus Operator translates it, scrapes
a real server that serves /metrics over TLS behind bearer tokens, while scrapes without the token, with
a wrong one or over plain HTTP are refused.

Certificates are made with the `openssl` command (EC P-256: fast); the server certificate names
`floworacle`, the name the probe and the ServiceMonitor check, and not the address they dial."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import METRICS_TLS, OVERLAYS, configmap_env, one, require_tool, serving_pod
from grpc_health.v1 import health_pb2

from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings

Build = Callable[[Path], list[dict[str, Any]]]

TLS_DIR = "/etc/floworacle/tls/"
PROBES_DIR = "/etc/floworacle/probes/"
PROMETHEUS_TOKEN = "prometheus-0123456789abcdef"
CLIENT_TOKEN = "training-job-fedcba9876543210"
TLS_OVERLAYS = ["gpu-sharded-monitoring", "monitoring-tls"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Secrets:
    """The files of the Secrets floworacle-tls (tls.crt, tls.key, ca.crt) and floworacle-tokens
    (tokens, prometheus), as they would be mounted, plus a certificate from another CA."""

    tls: Path
    tokens: Path
    prometheus_token: Path
    rogue_ca: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    (d / "server.ext").write_text(
        "subjectAltName=DNS:floworacle,DNS:floworacle-headless\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=floworacle", cwd=d,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "server.ext", cwd=d,
    )  # fmt: skip
    tls = d / "floworacle-tls"
    tls.mkdir()
    (tls / "tls.crt").write_bytes((d / "server.crt").read_bytes())
    (tls / "tls.key").write_bytes((d / "server.key").read_bytes())
    (tls / "ca.crt").write_bytes((d / "ca.crt").read_bytes())
    tokens = d / "floworacle-tokens"
    tokens.mkdir()
    (tokens / "tokens").write_text(f"# Prometheus\n{PROMETHEUS_TOKEN}\n# training jobs\n{CLIENT_TOKEN}\n")
    (tokens / "prometheus").write_text(PROMETHEUS_TOKEN)
    return Secrets(tls, tokens / "tokens", tokens / "prometheus", d / "rogue-ca.crt")


def built(build_overlay: Build, name: str) -> list[dict[str, Any]]:
    return build_overlay(next(p for p in OVERLAYS if p.name == name))


def probe_command(build_overlay: Build, overlay: str) -> list[str]:
    c = serving_pod(built(build_overlay, overlay)).container
    commands = {repr(c[p]["exec"]["command"]) for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert len(commands) == 1
    return list(c["readinessProbe"]["exec"]["command"])


def run_probe(command: list[str], secrets: Secrets, port: int, **replace: str) -> subprocess.CompletedProcess[str]:
    """The manifest's probe command with the pod's paths mapped to the files here, against the health
    server on `port`; `replace` swaps whole arguments (to try a wrong CA or name)."""
    argv = []
    for arg in command:
        arg = replace.get(arg, arg)
        arg = arg.replace(PROBES_DIR, f"{METRICS_TLS}/").replace(TLS_DIR, f"{secrets.tls}/")
        argv.append(arg)
    assert argv[0] == "python"
    env = {"FLOWORACLE_HEALTH_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=60, env=env, check=False)


def tls_settings(secrets: Secrets, **kw: Any) -> Settings:
    return Settings(
        device="cpu",
        tls_cert=str(secrets.tls / "tls.crt"),
        tls_key=str(secrets.tls / "tls.key"),
        **kw,
    )


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_the_tls_probe_passes_only_for_a_serving_tls_server(
    overlay: str, build_overlay: Build, secrets: Secrets
) -> None:
    command = probe_command(build_overlay, overlay)
    ca, name = command[2], command[3]
    settings = tls_settings(secrets, metrics_port=-1, auth_tokens_file=str(secrets.tokens), health_port=0)
    with serve_in_thread(settings) as srv:
        port = srv.server.health_port
        assert port is not None
        ok = run_probe(command, secrets, port)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "SERVING" in ok.stdout
        # the gRPC port's health needs a token: the probe must ask the health port
        closed = run_probe(command, secrets, srv.port)
        assert closed.returncode == 1 and "UNAUTHENTICATED" in closed.stdout, closed.stdout
        # Another CA, or a name the certificate does not carry: the handshake fails, so does the probe.
        rogue = run_probe(command, secrets, port, **{ca: str(secrets.rogue_ca)})
        assert rogue.returncode == 1, rogue.stdout + rogue.stderr
        wrong = run_probe(command, secrets, port, **{name: "not-floworacle"})
        assert wrong.returncode == 1, wrong.stdout + wrong.stderr
        # Draining (or not yet loaded): NOT_SERVING fails readiness.
        srv.call(srv.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        draining = run_probe(command, secrets, port)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout
    gone = run_probe(command, secrets, port)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stdout


def test_the_tls_probe_fails_against_a_plaintext_server(build_overlay: Build, secrets: Secrets) -> None:
    command = probe_command(build_overlay, "monitoring-tls")
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv:
        plain = run_probe(command, secrets, srv.port)
    assert plain.returncode == 1, plain.stdout + plain.stderr


# -- Prometheus scraping through the ServiceMonitor ------------------------------------------------


def scrape_config(endpoint: dict[str, Any], job: str, target: str, secret_file: Callable[[str, str], Path]) -> dict:
    """A Prometheus scrape config for one ServiceMonitor endpoint, translated as the Prometheus Operator
    does for the fields these manifests use (Secret references become files). Fields this function does
    not know fail, so a new field in the manifest cannot be silently left out of the test."""
    known = {"port", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig", "authorization"}
    assert set(endpoint) <= known, f"translate {sorted(set(endpoint) - known)} too"
    config: dict[str, Any] = {
        "job_name": job,
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http").lower(),
        "static_configs": [{"targets": [target]}],
    }
    tls = endpoint.get("tlsConfig")
    if tls is not None:
        assert set(tls) <= {"ca", "serverName", "insecureSkipVerify"}, tls
        config["tls_config"] = {
            "ca_file": str(secret_file(tls["ca"]["secret"]["name"], tls["ca"]["secret"]["key"])),
            "server_name": tls["serverName"],
            "insecure_skip_verify": tls.get("insecureSkipVerify", False),
        }
    auth = endpoint.get("authorization")
    if auth is not None:
        creds = auth["credentials"]
        config["authorization"] = {
            "type": auth.get("type", "Bearer"),
            "credentials_file": str(secret_file(creds["name"], creds["key"])),
        }
    return config


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}") as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def targets(self) -> dict[str, dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets") as r:
            body = json.load(r)
        return {t["labels"]["job"]: t for t in body["data"]["activeTargets"]}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[dict[str, Any]]], Prometheus]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(scrape_configs: list[dict[str, Any]]) -> Prometheus:
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": scrape_configs}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    require_tool("prometheus"),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return Prometheus(url, log)
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready after 30 s:\n{log.read_text()}"
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for_scrapes(prom: Prometheus, jobs: set[str], timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The targets of `jobs` once each was scraped at least once (health "up" or "down")."""
    deadline = time.monotonic() + timeout_s
    while True:
        targets = prom.targets()
        if all(targets.get(j, {}).get("health") in ("up", "down") for j in jobs):
            return targets
        assert time.monotonic() < deadline, f"not scraped after {timeout_s} s: {targets}\n{prom.log.read_text()}"
        time.sleep(0.3)


def test_prometheus_scrapes_through_the_servicemonitor_and_nobody_else_does(
    build_overlay: Build, secrets: Secrets, prometheus: Callable[[list[dict[str, Any]]], Prometheus]
) -> None:
    # Both TLS overlays take the endpoint from the same component: one Prometheus run covers them.
    endpoints = [one(built(build_overlay, o), "ServiceMonitor")["spec"]["endpoints"] for o in TLS_OVERLAYS]
    assert all(e == endpoints[0] for e in endpoints)
    objs = built(build_overlay, TLS_OVERLAYS[0])
    (endpoint,) = endpoints[0]
    env = configmap_env(objs, serving_pod(objs))
    assert env["FLOWORACLE_METRICS_TLS"] == "true" and env["FLOWORACLE_METRICS_AUTH"] == "true"
    files = {
        ("floworacle-tls", "ca.crt"): secrets.tls / "ca.crt",
        ("floworacle-tokens", "prometheus"): secrets.prometheus_token,
    }

    def secret_file(name: str, key: str) -> Path:
        assert (name, key) in files, f"the ServiceMonitor reads Secret {name} key {key}, which nobody makes"
        return files[(name, key)]

    wrong_token = secrets.prometheus_token.parent / "wrong"
    wrong_token.write_text("not-a-token-of-the-file")
    settings = tls_settings(secrets, auth_tokens_file=str(secrets.tokens), metrics_tls=True, metrics_auth=True)
    srv: RunningServer
    with serve_in_thread(settings) as srv:
        assert srv.metrics_port is not None
        target = f"127.0.0.1:{srv.metrics_port}"
        secure = scrape_config(endpoint, "servicemonitor", target, secret_file)
        no_token = {k: v for k, v in secure.items() if k != "authorization"} | {"job_name": "no-token"}
        wrong = secure | {
            "job_name": "wrong-token",
            "authorization": {"type": "Bearer", "credentials_file": str(wrong_token)},
        }
        plain = {k: v for k, v in no_token.items() if k != "tls_config"} | {"job_name": "plain-http", "scheme": "http"}
        prom = prometheus([secure, no_token, wrong, plain])
        targets = wait_for_scrapes(prom, {"servicemonitor", "no-token", "wrong-token", "plain-http"})
        assert targets["servicemonitor"]["health"] == "up", targets["servicemonitor"].get("lastError")
        for job in ("no-token", "wrong-token", "plain-http"):
            assert targets[job]["health"] == "down", f"{job} was allowed to scrape"
        info = prom.query('floworacle_dataset_info{job="servicemonitor"}')
        assert info and info[0]["metric"]["dataset"] == "digits"
        assert prom.query('floworacle_dataset_info{job!="servicemonitor"}') == []
