"""Validation of custom resources against the openAPIV3Schema of their published CRD (copies in
tests/deploy/crds/, sources in its README), the way the Kubernetes API server applies it: fields the
schema does not name are errors (kubectl's strict field validation; the server would otherwise prune
them silently), `x-kubernetes-list-type: map` lists have unique keys and `set` lists unique items. The
schema is plain JSON Schema otherwise (type, enum, pattern, required, anyOf, minimum, ...) and is
checked by the `jsonschema` package."""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_FILES = {
    ("leaderworkerset.x-k8s.io", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
# The sums of the files as released (tests/deploy/crds/README.md): a copy that was edited fails.
CRD_SHA256 = {
    "leaderworkerset.x-k8s.io_leaderworkersets.yaml": "c5dcad8ed943e495490241f00b9a1b45d51203b6d484020db3636d5bf553568e",
    "monitoring.coreos.com_servicemonitors.yaml": "a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32",
    "monitoring.coreos.com_prometheusrules.yaml": "78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d",
}
# ObjectMeta fields a manifest may set; the CRD leaves the top-level metadata to the API server.
OBJECT_META_FIELDS = {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}


@dataclass(frozen=True)
class CrdError(Exception):
    """A custom resource that its CRD's schema refuses; `errors` lists every violation."""

    kind: str
    name: str
    errors: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}: " + "; ".join(self.errors)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_yaml(path: Path) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the LWS CRD is 1.3 MB: the C parser is 7x faster
    with path.open("rb") as f:
        return yaml.load(f, Loader=loader)


def _python_pattern(pattern: str) -> str:
    """A Go (RE2) `pattern` as a Python regex. The one construct these CRDs use that Python refuses is a
    flag group after `^` (`^(?i)(abort|warn)?$`); Go applies it from there on, which at the start of
    the pattern is the same as Python's leading `(?i)`. Anything else that Python cannot compile fails
    loudly here rather than being checked with other rules than the API server's."""
    fixed = re.sub(r"^\^\(\?([a-z]+)\)", r"(?\1)^", pattern)
    re.compile(fixed)
    return fixed


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural schema where every object with `properties` refuses other fields, with
    its patterns in Python's regex syntax."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                node["pattern"] = _python_pattern(node["pattern"])
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key == "properties":
                    for sub in value.values():
                        walk(sub)
                elif key not in ("enum", "default", "required", "x-kubernetes-list-map-keys"):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(out)
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Any:
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for item in instance:
            if isinstance(item, dict):
                key = {k: item.get(k) for k in keys}
                if repr(key) in seen:
                    yield jsonschema.ValidationError(f"duplicate entry with {key}")
                seen.add(repr(key))
    elif list_type == "set":
        reprs = [repr(v) for v in instance]
        if len(set(reprs)) != len(reprs):
            yield jsonschema.ValidationError(f"duplicate items in a set list: {instance}")


_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    versions: dict[str, Any]  # served version name -> strict validator of its schema
    path: Path


@cache
def load_crd(group: str, kind: str) -> Crd:
    path = CRD_DIR / CRD_FILES[(group, kind)]
    crd = _load_yaml(path)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == group
    assert crd["spec"]["names"]["kind"] == kind
    versions = {}
    for v in crd["spec"]["versions"]:
        if v.get("served"):
            schema = _strict(v["schema"]["openAPIV3Schema"])
            _Validator.check_schema(schema)
            versions[v["name"]] = _Validator(schema)
    return Crd(group, kind, versions, path)


def crd_for(obj: dict[str, Any]) -> Crd | None:
    """The CRD copy of this object's kind, or None for kinds without one here (built-in kinds)."""
    group, _, _version = obj["apiVersion"].rpartition("/")
    if (group, obj["kind"]) not in CRD_FILES:
        return None
    return load_crd(group, obj["kind"])


def validate_custom_resource(obj: dict[str, Any]) -> None:
    """Raise CrdError unless `obj` is valid for its CRD (its apiVersion must be a served version)."""
    crd = crd_for(obj)
    name = obj.get("metadata", {}).get("name", "?")
    if crd is None:
        raise CrdError(obj.get("kind", "?"), name, (f"no CRD copy for {obj.get('apiVersion')} {obj.get('kind')}",))
    version = obj["apiVersion"].rpartition("/")[2]
    if version not in crd.versions:
        raise CrdError(crd.kind, name, (f"version {version!r} is not served; served: {sorted(crd.versions)}",))
    errors = [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in crd.versions[version].iter_errors(obj)
    ]
    extra_meta = set(obj.get("metadata", {})) - OBJECT_META_FIELDS
    if extra_meta:
        errors.append(f"metadata: unknown fields {sorted(extra_meta)}")
    if errors:
        raise CrdError(crd.kind, name, tuple(sorted(errors)))
