"""Every kustomize overlay builds, every object validates against the Kubernetes OpenAPI schemas (strict:
unknown fields are errors) or, for custom resources (LeaderWorkerSet, ServiceMonitor, PrometheusRule),
against the schema of its published CRD, and the objects agree with each other and with the server's
contract (gRPC probes on the gRPC port, read-only data, non-root, GPUs where promised, drain vs grace
period, metrics scraped the way the server serves them)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from crd_schema import CrdError
from deploy_support import (
    ADAPTER_VALUES,
    DEPLOY,
    METRICS_TLS,
    OVERLAYS,
    RULES_FILE,
    Pod,
    by_kind,
    configmap_env,
    mounted_secret,
    one,
    pods,
    serving_pod,
    validate,
    workload,
)

from floworacle_server.cli import build_parser
from floworacle_server.settings import ENV_PREFIX, Settings, load_settings

Build = Callable[[Path], list[dict[str, Any]]]

GPU_OVERLAYS = {"gpu", "monitoring", "monitoring-tls", "gpu-sharded", "gpu-sharded-monitoring"}
GANG_OVERLAYS = {"gpu-sharded", "gpu-sharded-monitoring"}
TLS_OVERLAYS = {"monitoring-tls", "gpu-sharded-monitoring"}
# torchrun SIGKILLs its ranks this long after it got SIGTERM (torch.distributed.run's default
# shutdown timeout); a gang's drain must end before it.
TORCHRUN_SHUTDOWN_TIMEOUT_S = 30
PROBE_SCRIPT = "grpc_health_tls.py"


def overlay_id(p: Path) -> str:
    return p.name


def test_the_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} >= {"cpu-dev", "gpu", "monitoring", *GANG_OVERLAYS, *TLS_OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_overlay_builds_and_validates_against_kubernetes_and_crd_schemas(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Service", "ConfigMap", "ServiceAccount"} <= kinds
    assert len(kinds & {"Deployment", "LeaderWorkerSet"}) == 1
    for obj in objs:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, CrdError) as e:
            pytest.fail(f"{overlay.name}: {obj['kind']}/{obj['metadata']['name']} invalid: {e}")


def test_validator_rejects_a_broken_object(build_overlay: Build) -> None:
    # Guards the test above against a validator that accepts anything.
    dep = one(build_overlay(OVERLAYS[0]), "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpcc"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_validator_rejects_broken_monitoring_objects(build_overlay: Build) -> None:
    objs = build_overlay(next(p for p in OVERLAYS if p.name == "monitoring-tls"))
    sm = one(objs, "ServiceMonitor")
    for path, value in [
        (("spec", "endpoints", 0, "scheme"), "htps"),
        (("spec", "endpoints", 0, "tlsConfig", "serverNam"), "floworacle"),
        (("spec", "endpoints", 0, "authorization", "credentials"), {"name": "floworacle-tokens"}),  # no key
        (("spec", "endpointz"), []),
    ]:
        broken = yaml.safe_load(yaml.safe_dump(sm))
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(CrdError):
            validate(broken)
    rule = yaml.safe_load(yaml.safe_dump(one(objs, "PrometheusRule")))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "five minutes"
    with pytest.raises(CrdError, match="for"):
        validate(rule)


def env_settings_keys(env: dict[str, str]) -> set[str]:
    return {k for k in env if k.startswith(ENV_PREFIX)}


def serve_argv(pod: Pod) -> list[str]:
    """The `floworacle serve ...` arguments of a pod: the image's entry point (`floworacle`) with the
    container's args, or `torchrun ... -m floworacle_server.cli` followed by them."""
    c = pod.container
    command = c.get("command", [])
    if not command:
        return list(c["args"])
    if command[0] == "floworacle":
        return [*command[1:], *c["args"]]
    assert command[0] == "torchrun", f"{pod.role}: unexpected command {command}"
    assert command[-2:] == ["-m", "floworacle_server.cli"], "torchrun runs the floworacle CLI module"
    return list(c["args"])


def pod_settings(objs: list[dict[str, Any]], pod: Pod) -> Settings:
    """The server settings the pod would run with: its args through the real `floworacle` parser and
    its ConfigMap environment through the real settings loader, which ignores variables it does not
    know; so every FLOWORACLE_* variable must also name a setting."""
    env = configmap_env(objs, pod)
    unknown = sorted(k for k in env_settings_keys(env) if k[len(ENV_PREFIX) :].lower() not in Settings.model_fields)
    assert not unknown, f"{pod.role}: {unknown} are no server settings (the server would ignore them)"
    args = build_parser().parse_args(serve_argv(pod))
    assert args.command == "serve"
    return load_settings(args, env=env)


def tls_probe_command(pod: Pod) -> list[str] | None:
    """The exec command of the TLS health probe, if the pod uses it (all three probes alike)."""
    commands = []
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = pod.container[probe]
        assert set(spec) & {"httpGet", "tcpSocket"} == set(), probe
        commands.append(spec["exec"]["command"] if "exec" in spec else None)
    assert all(c == commands[0] for c in commands), f"{pod.role}: the three probes check different things"
    return commands[0]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_probes_check_grpc_health_on_the_grpc_port(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    pod = serving_pod(objs)
    c = pod.container
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {"grpc", "metrics"} <= set(ports) <= {"grpc", "metrics", "rendezvous"}
    settings = pod_settings(objs, pod)
    assert settings.port == ports["grpc"]
    assert settings.metrics_port == ports["metrics"]
    command = tls_probe_command(pod)
    if settings.tls_cert is None:
        # The kubelet's native gRPC probe (plaintext) on the server as a whole.
        assert command is None
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": ports["grpc"], "service": ""}, probe
    else:
        # A TLS port refuses the kubelet's plaintext probe: the probe script checks the same health
        # service over TLS, trusting the CA of the server's own Secret.
        assert command is not None and command[0] == "python"
        script, ca_file, server_name = command[1:4]
        assert Path(script).name == PROBE_SCRIPT
        assert mounted_secret(pod, ca_file) == (mounted_secret(pod, settings.tls_cert)[0], "ca.crt")
        probe_map = mounted_configmap(objs, pod, script)
        assert probe_map == (METRICS_TLS / PROBE_SCRIPT).read_text(), "the pod runs the repository's probe script"
        assert server_name == "floworacle", "the probe checks the certificate for the Service's name"
        if settings.auth_tokens_file is not None:
            # health on the gRPC port needs a token then: the probe asks the open health server
            assert settings.health_port is not None and settings.health_port != settings.port


def mounted_configmap(objs: list[dict[str, Any]], pod: Pod, path: str) -> str:
    """The content of the ConfigMap file at `path` in the pod's container."""
    for mount in pod.container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = {v["name"]: v for v in pod.spec["volumes"]}[mount["name"]]
            maps = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
            return str(maps[volume["configMap"]["name"]]["data"][path[len(prefix) :]])
    raise AssertionError(f"no volume of the pod holds {path}")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_data_is_read_only_and_the_pods_run_unprivileged(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    for pod in pods(objs):
        spec, c = pod.spec, pod.container
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["data"]["mountPath"] == "/data" and mounts["data"]["readOnly"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        pvc = volumes["data"].get("persistentVolumeClaim")
        if pvc is not None:
            assert pvc["readOnly"] is True
            assert pvc["claimName"] in {o["metadata"]["name"] for o in by_kind(objs, "PersistentVolumeClaim")}
        for secret in (v for v in volumes.values() if "secret" in v):
            assert mounts[secret["name"]]["readOnly"] is True
            assert secret["secret"]["defaultMode"] & 0o007 == 0, "secrets must not be readable by others"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_rollout_keeps_capacity_and_grace_period_covers_the_drain(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    w = workload(objs)
    if w["kind"] == "Deployment":
        rolling = w["spec"]["strategy"]["rollingUpdate"]
    else:
        assert w["spec"]["rolloutStrategy"]["type"] == "RollingUpdate"
        rolling = w["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]
    assert rolling["maxUnavailable"] == 0
    assert rolling["maxSurge"] >= 1
    for pod in pods(objs):
        settings = pod_settings(objs, pod)
        needed = settings.shutdown_delay_s + settings.grace_period_s
        assert settings.shutdown_delay_s > 0, "without a shutdown delay the port closes before endpoints update"
        grace = pod.spec["terminationGracePeriodSeconds"]
        if w["kind"] == "LeaderWorkerSet":
            # torchrun gets the SIGTERM and kills its ranks TORCHRUN_SHUTDOWN_TIMEOUT_S later: rank 0's
            # drain must end before that, and Kubernetes must not kill torchrun before it.
            assert needed < TORCHRUN_SHUTDOWN_TIMEOUT_S < grace <= TORCHRUN_SHUTDOWN_TIMEOUT_S + 30, pod.role
        else:
            # Kubernetes kills the container at the grace period: it must exceed delay + drain, but not by
            # minutes (a stuck pod would hold a GPU that long).
            assert needed < grace <= needed + 30


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_pod_args_and_environment_are_valid_server_settings(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    ports = {p["name"]: p["containerPort"] for p in serving_pod(objs).container["ports"]}
    for pod in pods(objs):
        settings = pod_settings(objs, pod)
        assert settings.port == ports["grpc"]
        assert settings.metrics_port == ports["metrics"]
        # The metrics endpoint binds where the gRPC port does unless told otherwise.
        assert settings.host == "0.0.0.0" and (settings.metrics_host or settings.host) == "0.0.0.0"
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


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions, or a Service's plain map) matches."""
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if not match.items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok = {
            "In": value in expr.get("values", []),
            "NotIn": value not in expr.get("values", []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[expr["operator"]]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_services_select_the_serving_pods_and_name_their_ports(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    w = workload(objs)
    if w["kind"] == "Deployment":
        assert selects(w["spec"]["selector"], serving_pod(objs).labels)
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert set(services) == {"floworacle", "floworacle-headless"}
    assert services["floworacle-headless"]["spec"]["clusterIP"] == "None"
    # Clients of the headless Service see only pods that answer: not-ready ones stay out of DNS.
    assert not services["floworacle-headless"]["spec"].get("publishNotReadyAddresses", False)
    port_names = {p["name"] for p in serving_pod(objs).container["ports"]}
    for svc in services.values():
        for pod in pods(objs):
            # Only pods with the gRPC front: a gang's workers serve nothing to clients.
            assert selects(svc["spec"]["selector"], pod.labels) == pod.serves, (svc["metadata"]["name"], pod.role)
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names


@pytest.mark.parametrize("overlay", OVERLAYS, ids=overlay_id)
def test_disruption_budget_covers_every_pod(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    for pod in pods(objs):
        # Evicting a gang's worker restarts the whole gang, so workers count as much as leaders.
        assert selects(pdb["spec"]["selector"], pod.labels), pod.role


def test_gpu_overlays_ask_for_gpus_and_cpu_dev_does_not(build_overlay: Build) -> None:
    for overlay in OVERLAYS:
        objs = build_overlay(overlay)
        for pod in pods(objs):
            res = pod.container["resources"]
            device = configmap_env(objs, pod)["FLOWORACLE_DEVICE"]
            image = pod.container["image"]
            if overlay.name == "cpu-dev":
                assert "nvidia.com/gpu" not in res.get("limits", {})
                assert device == "cpu" and image.endswith("-cpu")
                continue
            assert overlay.name in GPU_OVERLAYS, f"{overlay.name}: add it to GPU_OVERLAYS or cpu-dev's checks"
            gpus = int(res["limits"]["nvidia.com/gpu"])
            # Extended resources are not overcommitted: a request, if given, equals the limit.
            assert int(res.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
            if pod.role == "server":
                assert gpus == 1
            else:
                assert gpus >= 1
            assert device == "cuda" and image.endswith("-cuda")
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.spec["tolerations"]


MONITORED = [p for p in OVERLAYS if p.name in {"monitoring", *TLS_OVERLAYS}]


@pytest.mark.parametrize("overlay", MONITORED, ids=overlay_id)
def test_monitoring_objects(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}

    sm = one(objs, "ServiceMonitor")
    selected = [s for s in services.values() if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert selected, "the ServiceMonitor selects no Service"
    for ep in sm["spec"]["endpoints"]:
        assert re.fullmatch(r"\d+s", ep["interval"]) and re.fullmatch(r"\d+s", ep["scrapeTimeout"])
        assert int(ep["scrapeTimeout"][:-1]) <= int(ep["interval"][:-1])
    # Exactly one selected Service exposes the metrics port, so each pod is scraped once; it selects only
    # the serving pods (a gang's leaders), the only ones with /metrics.
    with_port = [s for s in selected if any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in with_port] == ["floworacle"]
    assert [ep["port"] for ep in sm["spec"]["endpoints"]] == ["metrics"]

    rule = one(objs, "PrometheusRule")
    assert set(rule["spec"]) == {"groups"}
    plain = yaml.safe_load(RULES_FILE.read_text())
    assert rule["spec"]["groups"] == plain["groups"], "PrometheusRule and the plain rules file differ"

    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == (workload(objs)["kind"], workload(objs)["metadata"]["name"])
        adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
        exposed = {r["name"]["as"] for r in adapter["rules"]["custom"]}
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] in exposed


@pytest.mark.parametrize("overlay", MONITORED, ids=overlay_id)
def test_servicemonitor_scrapes_the_way_the_server_serves_metrics(overlay: Path, build_overlay: Build) -> None:
    """Plain HTTP where the server serves plain /metrics; with metrics TLS and tokens, HTTPS trusting the
    CA of the server's certificate Secret, checking a name the certificate must carry, and a bearer
    token from the same Secret whose `tokens` key the server reads."""
    objs = build_overlay(overlay)
    pod = serving_pod(objs)
    settings = pod_settings(objs, pod)
    (ep,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    if overlay.name not in TLS_OVERLAYS:
        assert settings.tls_cert is None and settings.auth_tokens_file is None
        assert ep.get("scheme", "http") == "http" and "tlsConfig" not in ep and "authorization" not in ep
        return
    fields = Settings.model_fields
    assert "metrics_tls" in fields and "metrics_auth" in fields, "the server has no metrics TLS / auth settings"
    assert settings.tls_cert is not None and settings.tls_key is not None and settings.auth_tokens_file is not None
    values = settings.model_dump()
    assert values["metrics_tls"] is True and values["metrics_auth"] is True
    cert_secret, cert_key = mounted_secret(pod, settings.tls_cert)
    assert (cert_key, mounted_secret(pod, settings.tls_key)) == ("tls.crt", (cert_secret, "tls.key"))
    tokens_secret, tokens_key = mounted_secret(pod, settings.auth_tokens_file)
    assert ep["scheme"] == "https"
    assert ep["tlsConfig"]["ca"] == {"secret": {"name": cert_secret, "key": "ca.crt"}}
    assert ep["tlsConfig"]["serverName"] == "floworacle"
    assert not ep["tlsConfig"].get("insecureSkipVerify", False)
    assert ep["authorization"]["type"] == "Bearer"
    # Prometheus' token is a key of the tokens Secret other than the server's tokens file.
    assert ep["authorization"]["credentials"]["name"] == tokens_secret
    assert ep["authorization"]["credentials"]["key"] != tokens_key
