"""Every kustomize overlay builds, every object validates against the Kubernetes OpenAPI schemas (strict:
unknown fields are errors), and the objects agree with each other and with the server's contract
(gRPC probes on the gRPC port, read-only data, non-root, GPUs where promised, drain vs grace period)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import ADAPTER_VALUES, DEPLOY, OVERLAYS, RULES_FILE

from floworacle_server.cli import build_parser
from floworacle_server.settings import Settings, load_settings

Build = Callable[[Path], list[dict[str, Any]]]

# The oldest Kubernetes we support (native gRPC probes are GA from 1.27) and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version() + ".0")
# Prometheus Operator custom resources have no schema in kubernetes-validate; test_monitoring_objects
# checks their structure and their references instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["floworacle"]
    return containers[0]


def overlay_id(p: Path) -> str:
    return p.name


def test_the_three_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} >= {"cpu-dev", "gpu", "monitoring"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_overlay_builds_and_validates_against_kubernetes_schemas(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay.name}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {e}")


def test_validator_rejects_a_broken_object(build_overlay: Build) -> None:
    # Guards the test above against a validator that accepts anything.
    dep = one(build_overlay(OVERLAYS[0]), "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpcc"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_probes_are_native_grpc_on_the_grpc_port(overlay: Path, build_overlay: Build) -> None:
    c = container(build_overlay(overlay))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = c[probe]
        assert set(spec) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert spec["grpc"] == {"port": ports["grpc"], "service": ""}, probe
    env = configmap_env(build_overlay(overlay))
    assert int(env["FLOWORACLE_PORT"]) == ports["grpc"]
    assert int(env["FLOWORACLE_METRICS_PORT"]) == ports["metrics"]


def configmap_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    c = container(objs)
    names = [src["configMapRef"]["name"] for src in c.get("envFrom", [])]
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for name in names:
        assert name in maps, f"envFrom names ConfigMap {name!r} which the overlay does not contain"
        env.update(maps[name])
    return env


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_data_is_read_only_and_the_pod_runs_unprivileged(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["data"]["mountPath"] == "/data" and mounts["data"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    pvc = volumes["data"].get("persistentVolumeClaim")
    if pvc is not None:
        assert pvc["readOnly"] is True
        assert pvc["claimName"] in {o["metadata"]["name"] for o in by_kind(objs, "PersistentVolumeClaim")}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_rollout_keeps_capacity_and_grace_period_covers_the_drain(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    dep = one(objs, "Deployment")
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    settings = pod_settings(objs)
    needed = settings.shutdown_delay_s + settings.grace_period_s
    assert settings.shutdown_delay_s > 0, "without a shutdown delay the port closes before endpoints update"
    # Kubernetes kills the container at the grace period: it must exceed delay + drain, but not by
    # minutes (a stuck pod would hold a GPU that long).
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert needed < grace <= needed + 30


def pod_settings(objs: list[dict[str, Any]]) -> Settings:
    """The server settings the pod would run with: its args through the real `floworacle` parser and
    its ConfigMap environment through the real settings loader."""
    c = container(objs)
    args = build_parser().parse_args([*c.get("command", [])[1:], *c["args"]])
    assert args.command == "serve"
    return load_settings(args, env=configmap_env(objs))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_pod_args_and_environment_are_valid_server_settings(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    settings = pod_settings(objs)
    ports = {p["name"]: p["containerPort"] for p in container(objs)["ports"]}
    assert settings.port == ports["grpc"]
    assert settings.metrics_port == ports["metrics"]
    assert settings.host == settings.metrics_host == "0.0.0.0"
    for spec in settings.data:
        path = spec.partition("=")[2] if "=" in spec else spec
        assert path.startswith("/data/"), f"data set {spec!r} is not on the read-only data volume"
    if overlay.name == "cpu-dev":
        assert settings.data == [] and settings.device == "cpu"  # the embedded digits set
    else:
        assert settings.data and settings.device == "cuda"


def test_dockerfiles_run_unprivileged_and_their_default_command_parses() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / name).read_text()
        user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
        assert user and user[-1].split(":")[0] not in ("0", "root"), name
        assert re.search(r'^VOLUME \["/data"\]', text, flags=re.M), name
        assert re.search(r'^ENTRYPOINT \["floworacle"\]', text, flags=re.M), name
        cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, flags=re.M)[-1])
        env = dict(re.findall(r"(FLOWORACLE_[A-Z_]+)=(\S+)", text))
        settings = load_settings(build_parser().parse_args(cmd), env=env)
        assert (settings.port, settings.metrics_port, settings.host) == (50051, 9090, "0.0.0.0")
        assert settings.device == ("cuda" if name.endswith("cuda") else "auto")
        assert (DEPLOY / "docker" / f"{name}.dockerignore").is_file()


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_services_select_the_pods_and_name_their_ports(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    dep = one(objs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(objs)["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert set(services) == {"floworacle", "floworacle-headless"}
    assert services["floworacle-headless"]["spec"]["clusterIP"] == "None"
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_gpu_overlays_ask_for_a_gpu_and_cpu_dev_does_not(build_overlay: Build) -> None:
    for overlay in OVERLAYS:
        objs = build_overlay(overlay)
        res = container(objs)["resources"]
        device = configmap_env(objs)["FLOWORACLE_DEVICE"]
        image = container(objs)["image"]
        if overlay.name == "cpu-dev":
            assert "nvidia.com/gpu" not in res.get("limits", {})
            assert device == "cpu" and image.endswith("-cpu")
        elif overlay.name in ("gpu", "monitoring"):
            assert int(res["limits"]["nvidia.com/gpu"]) == 1
            assert int(res["requests"]["nvidia.com/gpu"]) == 1
            assert device == "cuda" and image.endswith("-cuda")
            tolerations = one(objs, "Deployment")["spec"]["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_monitoring_objects(build_overlay: Build) -> None:
    objs = build_overlay(next(p for p in OVERLAYS if p.name == "monitoring"))
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}

    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    selected = [
        s for s in services.values() if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert selected, "the ServiceMonitor selects no Service"
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}
        assert re.fullmatch(r"\d+s", ep["interval"]) and re.fullmatch(r"\d+s", ep["scrapeTimeout"])
        assert int(ep["scrapeTimeout"][:-1]) <= int(ep["interval"][:-1])
    # Exactly one selected Service exposes the metrics port, so each pod is scraped once.
    with_port = [s for s in selected if any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in with_port] == ["floworacle"]
    assert [ep["port"] for ep in sm["spec"]["endpoints"]] == ["metrics"]

    rule = one(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    plain = yaml.safe_load(RULES_FILE.read_text())
    assert rule["spec"]["groups"] == plain["groups"], "PrometheusRule and the plain rules file differ"

    hpa = one(objs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert target["name"] in {d["metadata"]["name"] for d in by_kind(objs, "Deployment")}
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    exposed = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in exposed
