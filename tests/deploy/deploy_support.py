"""Helpers of the deploy tests: paths of the deploy artefacts, locating the external tools (installed by
deploy/ci-setup.sh), and reading the server's pods out of a built overlay, whether they come from a
Deployment (one kind of pod) or from a LeaderWorkerSet (a gang: the leader, rank 0, and the workers)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from crd_schema import crd_for, validate_custom_resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
GANG = K8S / "gang"
METRICS_TLS = K8S / "components" / "metrics-tls"
RULES_FILE = DEPLOY / "prometheus" / "floworacle-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "floworacle-dashboard.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"

# The oldest Kubernetes we support (native gRPC probes are GA from 1.27) and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version() + ".0")
LWS_API = "leaderworkerset.x-k8s.io/v1"
# The environment variables the LeaderWorkerSet controller injects into every container of a group.
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails the test (never skips it): these checks are the
    point of the deploy tests, and `bash deploy/ci-setup.sh` installs everything they need."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name!r} not found on PATH: run `bash deploy/ci-setup.sh` (as root) to install it")
    return path


def kustomize_command() -> list[str]:
    """`kustomize build` if a standalone kustomize exists, else `kubectl kustomize` (kubectl >= 1.27)."""
    standalone = shutil.which("kustomize")
    if standalone:
        return [standalone, "build"]
    return [require_tool("kubectl"), "kustomize"]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Pod:
    """One kind of server pod: `role` is "server" (a Deployment's pods), "leader" (rank 0 of a gang:
    gRPC, health, metrics) or "worker" (the other ranks of a gang)."""

    role: str
    template: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def container(self) -> dict[str, Any]:
        containers = self.spec["containers"]
        assert [c["name"] for c in containers] == ["floworacle"], f"{self.role}: one container named floworacle"
        return containers[0]

    @property
    def serves(self) -> bool:
        """Whether this pod holds the gRPC front (and health and metrics)."""
        return self.role in ("server", "leader")


def workload(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The overlay's one server workload: a Deployment or a LeaderWorkerSet."""
    found = [o for o in objs if o["kind"] in ("Deployment", "LeaderWorkerSet")]
    assert len(found) == 1, f"expected one Deployment or LeaderWorkerSet, found {[o['kind'] for o in found]}"
    return found[0]


def pods(objs: list[dict[str, Any]]) -> list[Pod]:
    w = workload(objs)
    if w["kind"] == "Deployment":
        return [Pod("server", w["spec"]["template"])]
    assert w["apiVersion"] == LWS_API
    lwt = w["spec"]["leaderWorkerTemplate"]
    return [Pod("leader", lwt["leaderTemplate"]), Pod("worker", lwt["workerTemplate"])]


def serving_pod(objs: list[dict[str, Any]]) -> Pod:
    """The pod with the gRPC port: the Deployment's pod or the gang's leader."""
    (pod,) = [p for p in pods(objs) if p.serves]
    return pod


def configmap_env(objs: list[dict[str, Any]], pod: Pod) -> dict[str, str]:
    """The environment a pod's container gets from its ConfigMaps (envFrom), checked to exist."""
    names = [src["configMapRef"]["name"] for src in pod.container.get("envFrom", [])]
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for name in names:
        assert name in maps, f"envFrom names ConfigMap {name!r} which the overlay does not contain"
        env.update(maps[name])
    return env


def mounted_secret(pod: Pod, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the pod's container, via its volume mounts."""
    for mount in pod.container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = {v["name"]: v for v in pod.spec["volumes"]}[mount["name"]]
            assert "secret" in volume, f"{path} is on volume {mount['name']!r}, not a Secret"
            assert mount.get("readOnly") is True, f"{mount['mountPath']} should be mounted read-only"
            rel = path[len(prefix) :]
            items = volume["secret"].get("items")
            if items is not None:
                (key,) = [i["key"] for i in items if i["path"] == rel]
                return volume["secret"]["secretName"], key
            return volume["secret"]["secretName"], rel
    raise AssertionError(f"no volume of the pod holds {path}")


def validate(obj: dict[str, Any]) -> None:
    """Validate one object as the API server would: a custom resource against its CRD copy (and the pod
    templates of a LeaderWorkerSet also as Kubernetes PodTemplates), anything else against the
    Kubernetes schemas of every version in K8S_VERSIONS. Raises on the first invalid object."""
    if crd_for(obj) is not None:
        validate_custom_resource(obj)
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{obj['metadata']['name']}-{role}"},
                    "template": lwt[role],
                }
                for version in K8S_VERSIONS:
                    kubernetes_validate.validate(template, version, strict=True)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
