"""Fixtures of the deploy tests: kustomize overlays built once per session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

# Makes deploy_support importable from the test modules of this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_support import kustomize_command


@pytest.fixture(scope="session")
def build_overlay() -> Callable[[Path], list[dict[str, Any]]]:
    """Builds an overlay directory with kustomize and returns its objects (cached per session)."""
    cache: dict[Path, list[dict[str, Any]]] = {}

    def build(path: Path) -> list[dict[str, Any]]:
        if path not in cache:
            proc = subprocess.run(
                [*kustomize_command(), str(path)], capture_output=True, text=True, timeout=120, check=False
            )
            assert proc.returncode == 0, f"kustomize failed for {path}:\n{proc.stderr}"
            cache[path] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[path]

    return build
