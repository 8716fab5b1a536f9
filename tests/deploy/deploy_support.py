"""Helpers of the deploy tests: paths of the deploy artefacts and locating the external tools (installed by
deploy/ci-setup.sh)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
RULES_FILE = DEPLOY / "prometheus" / "floworacle-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "floworacle-dashboard.json"
ADAPTER_VALUES = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"


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
