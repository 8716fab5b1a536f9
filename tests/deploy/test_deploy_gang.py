"""The sharded gang on Kubernetes (overlays gpu-sharded and gpu-sharded-monitoring): a LeaderWorkerSet
that validates against the published LWS CRD and the controller's admission rules, restarts the whole
group when any pod fails, forms one torch.distributed gang from the environment the LWS controller
injects (checked with torchrun's own argument parser and launch configuration), keeps leader and
workers on the same server settings, and takes its size from one parameters file."""

from __future__ import annotations

import copy
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import torch
import yaml
from crd_schema import CRD_DIR, CRD_FILES, CRD_SHA256, CrdError, sha256, validate_custom_resource
from deploy_support import (
    GANG,
    K8S,
    LWS_ENV,
    OVERLAYS,
    by_kind,
    configmap_env,
    one,
    pods,
    validate,
)
from torch.distributed import run as torchrun

Build = Callable[[Path], list[dict[str, Any]]]

GANGS = [p for p in OVERLAYS if p.name in {"gpu-sharded", "gpu-sharded-monitoring"}]
NAMESPACE = "floworacle"
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def overlay_id(p: Path) -> str:
    return p.name


def lws_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "LeaderWorkerSet")


def webhook_errors(lws: dict[str, Any]) -> list[str]:
    """The LWS admission webhook's rules that the CRD schema does not express (lws v0.10.0,
    pkg/webhooks/leaderworkerset_webhook.go generalValidate), after the webhook's defaults."""
    errors = []
    name = lws["metadata"]["name"]
    if not (len(name) <= 63 and DNS_1035.fullmatch(name)):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label (it names the headless Service)")
    spec = lws["spec"]
    replicas = spec.get("replicas", 1)
    if not 0 <= replicas <= 1_000_000:
        errors.append(f"replicas {replicas} outside 0..1000000")
    size = spec["leaderWorkerTemplate"].get("size", 1)
    if size < 1:
        errors.append(f"size {size} must be >= 1")
    rolling = spec.get("rolloutStrategy", {}).get("rollingUpdateConfiguration", {})
    surge, unavailable = rolling.get("maxSurge", 0), rolling.get("maxUnavailable", 1)
    for field, value in (("maxSurge", surge), ("maxUnavailable", unavailable)):
        if not isinstance(value, int) or value < 0:
            errors.append(f"{field} {value!r}: these manifests use non-negative integers")
    if surge == 0 and unavailable == 0 and replicas != 0:
        errors.append("maxUnavailable must not be 0 when maxSurge is 0")
    return errors


def test_crd_copies_are_the_published_files() -> None:
    assert set(CRD_SHA256) == set(CRD_FILES.values())
    for name, digest in CRD_SHA256.items():
        assert sha256(CRD_DIR / name) == digest, f"{name} differs from the release copy (crds/README.md)"
        assert f"`{digest}`" in (CRD_DIR / "README.md").read_text(), f"crds/README.md does not list {name}'s sum"


@pytest.mark.parametrize("overlay", GANGS, ids=overlay_id)
def test_the_group_starts_together_and_restarts_whole(overlay: Path, build_overlay: Build) -> None:
    lws = lws_of(build_overlay(overlay))
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    # The leader turns ready only once every rank joined, so the workers must not wait for it.
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    # A rank's failure ends its torchrun and restarts its container: every pod of the group is recreated.
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert webhook_errors(lws) == []
    for pod in pods(build_overlay(overlay)):
        # torchrun must not restart ranks in place: a lone new rank cannot rejoin a running gang.
        assert "--max-restarts=0" in pod.container["command"], pod.role
        assert pod.spec.get("restartPolicy", "Always") == "Always"


@pytest.mark.parametrize("overlay", GANGS, ids=overlay_id)
def test_the_lws_headless_service_does_not_take_a_name_of_ours(overlay: Path, build_overlay: Build) -> None:
    # The LWS controller creates (or, if one exists, silently reuses) a headless Service named after the
    # LeaderWorkerSet for the pods' DNS names; reusing our ClusterIP Service would leave
    # LWS_LEADER_ADDRESS unresolvable.
    objs = build_overlay(overlay)
    lws = lws_of(objs)
    assert lws["spec"]["networkConfig"]["subdomainPolicy"] == "Shared"
    assert lws["metadata"]["name"] not in {s["metadata"]["name"] for s in by_kind(objs, "Service")}


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "restartPolicy not in the enum": lambda o: o["spec"]["leaderWorkerTemplate"].update(restartPolicy="RecreateGroup"),
    "startupPolicy not in the enum": lambda o: o["spec"].update(startupPolicy="LeaderStarted"),
    "size as a string": lambda o: o["spec"]["leaderWorkerTemplate"].update(size="4"),
    "unknown spec field": lambda o: o["spec"].update(leaderWorkerTemplates={}),
    "workerTemplate missing": lambda o: o["spec"]["leaderWorkerTemplate"].pop("workerTemplate"),
    "rollout type not in the enum": lambda o: o["spec"]["rolloutStrategy"].update(type="Recreate"),
    "unknown probe field": lambda o: o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0][
        "readinessProbe"
    ].update(grpcc={}),
    "probe port by name": lambda o: o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0][
        "livenessProbe"
    ]["grpc"].update(port="grpc"),
    "duplicate env names": lambda o: o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][
        0
    ].update(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
    "unknown metadata field": lambda o: o["metadata"].update(label={}),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_a_broken_leaderworkerset_fails_validation(mutation: str, build_overlay: Build) -> None:
    # Guards the schema check: the overlay's object passes, each single breakage fails.
    lws = lws_of(build_overlay(GANGS[0]))
    validate(lws)
    broken = copy.deepcopy(lws)
    MUTATIONS[mutation](broken)
    with pytest.raises((CrdError, kubernetes_validate.ValidationError)):
        validate(broken)


def test_a_pod_spec_the_crd_allows_but_kubernetes_refuses_fails(build_overlay: Build) -> None:
    # The CRD embeds the pod schema of a newer Kubernetes than the oldest one we support: the templates
    # are also checked as Kubernetes PodTemplates of every supported version (hostnameOverride is 1.34).
    lws = lws_of(build_overlay(GANGS[0]))
    broken = copy.deepcopy(lws)
    broken["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["hostnameOverride"] = "rank"
    validate_custom_resource(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args (`$$` escapes a dollar sign)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    out = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)
    assert "$(" not in out, f"{value!r}: a variable the container does not have stays unexpanded"
    return out


def lws_env(lws: dict[str, Any], group: int, worker: int) -> dict[str, str]:
    """What the LWS controller injects into pod `worker` of group `group` (v0.10.0, pod_utils.go)."""
    name = lws["metadata"]["name"]
    return {
        "LWS_LEADER_ADDRESS": f"{name}-{group}.{name}.{NAMESPACE}",
        "LWS_GROUP_SIZE": str(lws["spec"]["leaderWorkerTemplate"]["size"]),
        "LWS_WORKER_INDEX": str(worker),
    }


@pytest.fixture
def visible_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[int], None]:
    """Make torch see `n` GPUs, as the device plugin shows a pod exactly its nvidia.com/gpu limit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's config sets it otherwise, for the whole process
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # torchrun's log directory

    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_gpus


@pytest.mark.parametrize("overlay", GANGS, ids=overlay_id)
def test_torchrun_forms_one_gang_from_the_lws_environment(
    overlay: Path, build_overlay: Build, visible_gpus: Callable[[int], None]
) -> None:
    objs = build_overlay(overlay)
    lws = lws_of(objs)
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    leader, worker = pods(objs)
    rendezvous_port = {p["name"]: p["containerPort"] for p in leader.container["ports"]}["rendezvous"]
    world, seen_ranks = None, set()
    for index in range(size):
        pod = leader if index == 0 else worker
        c = pod.container
        assert {e for e in re.findall(r"\$\((\w+)\)", " ".join(c["command"] + c["args"]))} <= set(LWS_ENV)
        env = lws_env(lws, group=0, worker=index)
        argv = [expand(a, env) for a in c["command"] + c["args"]]
        assert argv[0] == "torchrun"
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        visible_gpus(gpus)
        args = torchrun.get_args_parser().parse_args(argv[1:])
        config, cmd, cmd_args = torchrun.config_from_args(args)
        # Static rendezvous at the leader's address, on the port the leader declares.
        assert config.rdzv_backend == "static"
        assert config.rdzv_endpoint == f"{env['LWS_LEADER_ADDRESS']}:{rendezvous_port}"
        assert config.min_nodes == config.max_nodes == size
        assert config.rdzv_configs["rank"] == index
        assert config.nproc_per_node == gpus
        assert config.max_restarts == 0
        shutdown = getattr(config, "shutdown_timeout", None)
        assert shutdown in (None, 30), "the drain budget in the manifests assumes torchrun's 30 s"
        assert cmd_args[-3:] == ["-m", "floworacle_server.cli", "serve"]
        # Ranks of node i are i * nproc + local rank: global rank 0 (gRPC, health, metrics) is on the leader.
        ranks = {index * gpus + local for local in range(gpus)}
        assert (0 in ranks) == (pod.role == "leader")
        assert not ranks & seen_ranks
        seen_ranks |= ranks
        world = gpus if world is None else world + gpus
    assert seen_ranks == set(range(world or 0))


SHARED_EXCEPT = {"ports", "startupProbe", "livenessProbe", "readinessProbe", "volumeMounts"}


@pytest.mark.parametrize("overlay", GANGS, ids=overlay_id)
def test_leader_and_workers_run_the_same_server(overlay: Path, build_overlay: Build) -> None:
    objs = build_overlay(overlay)
    leader, worker = pods(objs)
    assert configmap_env(objs, leader) == configmap_env(objs, worker)
    lc, wc = leader.container, worker.container
    for key in set(lc) | set(wc):
        if key not in SHARED_EXCEPT:
            assert lc.get(key) == wc.get(key), f"leader and workers differ in {key}"
    # The workers serve nothing on the network and have no health service to probe.
    assert not set(wc) & {"ports", "startupProbe", "livenessProbe", "readinessProbe"}
    # The leader may mount more (the probe script); everything a worker mounts, the leader mounts alike.
    leader_mounts = {m["name"]: m for m in lc["volumeMounts"]}
    for m in wc["volumeMounts"]:
        assert leader_mounts[m["name"]] == m
    leader_volumes = {v["name"]: v for v in leader.spec["volumes"]}
    for v in worker.spec["volumes"]:
        assert leader_volumes[v["name"]] == v
    for key in set(leader.spec) | set(worker.spec):
        if key not in {"containers", "volumes"}:
            assert leader.spec.get(key) == worker.spec.get(key), f"leader and worker pods differ in {key}"
    assert leader.labels["app.kubernetes.io/component"] == "server"
    assert worker.labels["app.kubernetes.io/component"] == "shard"


@pytest.mark.parametrize("overlay", GANGS, ids=overlay_id)
def test_ranks_in_one_pod_get_shared_memory_for_nccl(overlay: Path, build_overlay: Build) -> None:
    for pod in pods(build_overlay(overlay)):
        mounts = {m["mountPath"]: m["name"] for m in pod.container["volumeMounts"]}
        volume = {v["name"]: v for v in pod.spec["volumes"]}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        # A memory-backed volume counts against the container's memory limit.
        limit = kubernetes_quantity(pod.container["resources"]["limits"]["memory"])
        assert kubernetes_quantity(volume["emptyDir"]["sizeLimit"]) < limit / 4


def kubernetes_quantity(q: str | int) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, q
    factor = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(m.group(1)) * factor[m.group(2)]


def sized_gang(tmp_path: Path, pods_per_gang: str, gpus_per_pod: str) -> Path:
    """An overlay of one's own, as deploy/README.md describes it: the gang directory, a parameters file
    and the component that applies it."""
    (tmp_path / "gang-parameters.yaml").write_text(
        textwrap.dedent(f"""\
            apiVersion: v1
            kind: ConfigMap
            metadata:
              name: floworacle-gang-parameters
              annotations:
                config.kubernetes.io/local-config: "true"
            data:
              podsPerGang: "{pods_per_gang}"
              gpusPerPod: "{gpus_per_pod}"
            """)
    )
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(GANG, tmp_path), "gang-parameters.yaml"],
                "components": [os.path.relpath(K8S / "components" / "gang-parameters", tmp_path)],
            }
        )
    )
    return tmp_path


def test_one_parameters_file_sizes_the_gang(tmp_path: Path, build_overlay: Build) -> None:
    shipped = yaml.safe_load((K8S / "overlays" / "gpu-sharded" / "gang-parameters.yaml").read_text())["data"]
    lws = lws_of(build_overlay(K8S / "overlays" / "gpu-sharded"))
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == int(shipped["podsPerGang"])
    objs = build_overlay(sized_gang(tmp_path, "3", "2"))
    assert not [o for o in objs if o["metadata"]["name"] == "floworacle-gang-parameters"], "applied, not local"
    lws = lws_of(objs)
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 3
    for pod in pods(objs):
        assert pod.container["resources"]["limits"]["nvidia.com/gpu"] == 2, pod.role
        assert "nvidia.com/gpu" not in pod.container["resources"].get("requests", {})
    validate(lws)
    assert webhook_errors(lws) == []


def test_the_gang_directory_without_parameters_is_refused(build_overlay: Build) -> None:
    # Placeholders (size 0, no GPUs) that the LWS admission webhook rejects, so a gang is never started
    # with a size nobody chose.
    lws = lws_of(build_overlay(GANG))
    assert any("size" in e for e in webhook_errors(lws))
    for pod in pods(build_overlay(GANG)):
        assert pod.container["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_the_readmes_own_overlay_for_a_gang_builds_and_validates(tmp_path: Path, build_overlay: Build) -> None:
    # deploy/README.md's example overlay, as written there, next to a copy of the parameters file.
    readme = (K8S.parent / "README.md").read_text()
    m = re.search(
        r"```yaml\n(# my-cluster/kustomization.yaml, next to your gang-parameters.yaml\n.*?)```", readme, re.S
    )
    assert m, "deploy/README.md no longer has the gang overlay example"
    root = tmp_path / "my-cluster"
    root.mkdir()
    deploy = os.path.relpath(K8S.parent, root)
    (root / "kustomization.yaml").write_text(m.group(1).replace("../deploy/", f"{deploy}/"))
    (root / "gang-parameters.yaml").write_text((K8S / "overlays" / "gpu-sharded" / "gang-parameters.yaml").read_text())
    objs = build_overlay(root)
    for obj in objs:
        validate(obj)
        assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
    lws = lws_of(objs)
    assert lws["spec"]["replicas"] == 2 and webhook_errors(lws) == []
    for pod in pods(objs):
        assert pod.container["image"] == "registry.example.com/ml/floworacle:0.1.0-cuda"
        assert configmap_env(objs, pod)["FLOWORACLE_DATA"] == "web=/data/web_index"
