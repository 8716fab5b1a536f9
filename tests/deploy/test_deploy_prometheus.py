"""The monitoring artefacts against real systems: promtool checks the rules file, and a real Prometheus
(Debian's package, started here on loopback with a 1 s scrape interval) scrapes a real Flow Oracle server
while an SDK client sends real traffic. Every PromQL expression of the Grafana dashboard, the recording and
alerting rules and the prometheus-adapter rule must then evaluate without error and return data.

Alert expressions are conditions ("<query> > threshold") that are empty while nothing is wrong, so each is
checked twice: the whole expression must evaluate without error, and the query without its threshold
comparison must return series. This is why every alert in the rules file has that shape (a test below
enforces it): the query itself is what Prometheus would compare, so its data proves the alert can fire.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from deploy_support import ADAPTER_VALUES, DASHBOARD, RULES_FILE, require_tool

from floworacle import OracleClient, OracleError
from floworacle.protocol import encode
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

NAMESPACE = "floworacle-test"
POD = "floworacle-test-0"
# Labels the ServiceMonitor's targets carry in a cluster; the static target here gets the same ones.
TARGET_LABELS = {"namespace": NAMESPACE, "pod": POD, "service": "floworacle"}
# Grafana's variables as the dashboard would expand them for this target ($pod "All" is ".*").
GRAFANA_VARS = {"$__rate_interval": "30s", "$namespace": NAMESPACE, "$pod": ".*", "${datasource}": ""}
DATA_WAIT_S = 60.0
TRAFFIC_MAX_S = 120.0
ALERT_SHAPE = re.compile(r"^(?P<query>.*?\S)\s*(?:>|<|>=|<=|==|!=)\s*-?[0-9.]+\s*$", re.S)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Traffic:
    """Counts of what the client saw, to compare with what Prometheus scraped."""

    oracle_ok: int = 0
    nearest_ok: int = 0
    invalid: int = 0
    not_found: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def send_traffic(address: str, traffic: Traffic) -> None:
    """Oracle and nearest queries of a few rows, dataset listing, and some bad requests, until stopped
    (or TRAFFIC_MAX_S passed)."""
    rng = np.random.default_rng(0)
    end = time.monotonic() + TRAFFIC_MAX_S
    try:
        with OracleClient(address) as client, grpc.insecure_channel(address) as channel:
            stub = pb_grpc.FlowOracleStub(channel)
            dim = client.describe().dim
            while not traffic.stop.is_set() and time.monotonic() < end:
                rows = int(rng.integers(1, 9))
                x = rng.standard_normal((rows, dim)).astype(np.float32)
                client.velocity(x, rng.uniform(0.05, 0.95, rows), timeout=10)
                traffic.oracle_ok += 1
                client.nearest(x, k=3, timeout=10)
                traffic.nearest_ok += 1
                client.datasets(timeout=10)
                # t outside [0, 1]: the SDK would refuse it, so send it on the raw stub to reach the server.
                bad = pb.OracleRequest(x_t=encode(x[:1]), t=encode(np.array([3.0], dtype=np.float32)))
                try:
                    stub.Oracle(bad, timeout=10)
                    traffic.errors.append("t = 3 was accepted")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        traffic.errors.append(f"t = 3 gave {e.code()}")
                    traffic.invalid += 1
                try:
                    client.describe("no-such-dataset", timeout=10)
                except OracleError:
                    traffic.not_found += 1
                time.sleep(0.05)
    except Exception as exc:  # surfaced by the tests, which check traffic.errors
        traffic.errors.append(repr(exc))


@dataclass
class Stack:
    url: str
    traffic: Traffic
    thread: threading.Thread
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error in the body
            body = json.load(e)
        return body

    def query(self, expr: str) -> tuple[list[Any] | None, str | None]:
        """(result, None) on success or (None, error) when Prometheus rejects the expression."""
        body = self.api("/api/v1/query", query=expr)
        if body.get("status") != "success":
            return None, f"{body.get('errorType')}: {body.get('error')}"
        result = body["data"]["result"]
        return (result if body["data"]["resultType"] in ("vector", "matrix") else [result]), None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    # The rules as shipped, except that every group is evaluated at the global 1 s interval.
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        group.pop("interval", None)
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))

    settings = Settings(device="cpu", max_queue_delay_ms=1.0)
    with serve_in_thread(settings) as srv:
        assert srv.metrics_port is not None
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "floworacle",
                    "static_configs": [{"targets": [f"127.0.0.1:{srv.metrics_port}"], "labels": TARGET_LABELS}],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp / "prometheus.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        traffic = Traffic()
        thread = threading.Thread(target=send_traffic, args=(srv.address, traffic), daemon=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"prometheus not ready after 30 s:\n{log.read_text()}")
                time.sleep(0.2)
            thread.start()
            yield Stack(url, traffic, thread, log)
        finally:
            traffic.stop.set()
            if thread.is_alive():
                thread.join(15)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_for_data(stack: Stack, exprs: dict[str, str]) -> None:
    """Poll every expression until each returned at least one series; fail at once on a PromQL error,
    and after DATA_WAIT_S with the list of expressions that stayed empty."""
    pending = dict(exprs)
    deadline = time.monotonic() + DATA_WAIT_S
    while pending:
        for name, expr in list(pending.items()):
            result, error = stack.query(expr)
            assert error is None, f"{name}: Prometheus rejects\n  {expr}\n  {error}"
            if result:
                del pending[name]
        if not pending:
            break
        assert not stack.traffic.errors, f"traffic failed: {stack.traffic.errors}"
        if time.monotonic() > deadline:
            listing = "\n".join(f"  {n}: {e}" for n, e in pending.items())
            pytest.fail(f"no data after {DATA_WAIT_S} s for:\n{listing}\nprometheus log:\n{stack.log.read_text()}")
        time.sleep(0.5)


def expand_grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
    return expr


def dashboard_exprs() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    out: dict[str, str] = {}
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out[f"panel {panel['title']!r} {target['refId']}"] = expand_grafana(target["expr"])
    return out


def test_promtool_accepts_the_rules_file() -> None:
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_rules = sum(len(g["rules"]) for g in yaml.safe_load(RULES_FILE.read_text())["groups"])
    assert f"SUCCESS: {n_rules} rules found" in proc.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    # Guards the check above: promtool must actually parse the PromQL.
    promtool = require_tool("promtool")
    rules = yaml.safe_load(RULES_FILE.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum by (job (rate(floworacle_requests_total[5m]))"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def test_every_alert_is_a_query_compared_with_a_threshold() -> None:
    alerts = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "FlowOracleHighErrorRate",
        "FlowOracleHighLatencyP99",
        "FlowOracleQueueSaturated",
        "FlowOracleInstanceDown",
    }
    for a in alerts:
        assert ALERT_SHAPE.match(a["expr"]), f"{a['alert']}: write it as '<query> <op> <number>'"
        assert a["labels"]["severity"] in ("warning", "critical")
        assert a["annotations"]["summary"] and a["annotations"]["description"]


def test_dashboard_covers_the_required_views() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(dashboard_exprs().values())
    for needle in (
        "floworacle_requests_total",  # request rate, errors by code
        "histogram_quantile(0.5, sum by (method, le) (rate(floworacle_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (method, le) (rate(floworacle_request_duration_seconds_bucket",
        "floworacle_queue_duration_seconds_bucket",
        "floworacle_compute_duration_seconds_bucket",
        "floworacle_batch_rows_bucket",
        'code!="OK"',
        "floworacle_device_memory_used_bytes",
        "sum by (pod)",
    ):
        assert needle in exprs, needle
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "pod"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # Panels sit on Grafana's 24-column grid without overlapping.
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and p["description"], p["title"]


def test_dashboard_and_rule_expressions_return_data_from_a_live_server(stack: Stack) -> None:
    exprs = dashboard_exprs()
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                exprs[f"recording rule {rule['record']}"] = rule["expr"]
                # The recorded series itself, written back by Prometheus' rule evaluation.
                exprs[f"recorded series {rule['record']}"] = rule["record"]
            else:
                m = ALERT_SHAPE.match(rule["expr"])
                assert m is not None
                exprs[f"alert {rule['alert']} (query without threshold)"] = m.group("query")
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    for i, rule in enumerate(adapter["rules"]["custom"]):
        series = re.sub(r"\{.*\}$", "", rule["seriesQuery"].strip("'"))
        exprs[f"adapter series query {i}"] = rule["seriesQuery"]
        exprs[f"adapter metrics query {i}"] = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
            .replace("<<.GroupBy>>", "pod")
        )
    wait_for_data(stack, exprs)

    # The whole alert expressions parse and evaluate too (empty results are expected: nothing is wrong).
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                _, error = stack.query(rule["expr"])
                assert error is None, f"alert {rule['alert']}: {error}"

    # Prometheus evaluated every rule without error.
    body = stack.api("/api/v1/rules")
    evaluated = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert len(evaluated) == sum(len(g["rules"]) for g in rules["groups"])
    bad = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
    assert not bad, bad


def test_dashboard_variables_find_the_target(stack: Stack) -> None:
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector, label = expand_grafana(m.group(1)), m.group(2)
        deadline = time.monotonic() + DATA_WAIT_S
        while True:
            values = stack.api(f"/api/v1/label/{label}/values", **{"match[]": selector})["data"]
            if values or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert values == [TARGET_LABELS[label]], (var["name"], values)


def test_scraped_counts_equal_the_traffic_sent(stack: Stack) -> None:
    # Let traffic run until Prometheus has seen some, then stop it and compare totals once the final
    # values are scraped: every request the client completed is counted once, with its status code.
    wait_for_data(stack, {"oracle ok": 'floworacle_requests_total{method="Oracle",code="OK"} > 3'})
    stack.traffic.stop.set()
    stack.thread.join(15)
    assert not stack.thread.is_alive()
    assert not stack.traffic.errors, stack.traffic.errors
    t = stack.traffic
    expected = {
        'floworacle_requests_total{method="Oracle",code="OK"}': t.oracle_ok,
        'floworacle_requests_total{method="Nearest",code="OK"}': t.nearest_ok,
        'floworacle_requests_total{method="Oracle",code="INVALID_ARGUMENT"}': t.invalid,
        'floworacle_requests_total{method="DescribeDataset",code="NOT_FOUND"}': t.not_found,
        'floworacle_rejected_requests_total{reason="invalid"}': t.invalid,
        'floworacle_rejected_requests_total{reason="not_found"}': t.not_found,
    }
    deadline = time.monotonic() + 20
    while True:
        got = {}
        for expr in expected:
            result, error = stack.query(expr)
            assert error is None, error
            got[expr] = float(result[0]["value"][1]) if result else None
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected
    assert t.oracle_ok > 3 and t.invalid > 3
