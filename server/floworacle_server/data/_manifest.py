"""The manifest of an index directory (``manifest.json``): its format tag and version, read and
written atomically. The layout it describes is :mod:`._index`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "MANIFEST", "read_manifest", "write_manifest"]

INDEX_FORMAT = "floworacle-index"
INDEX_VERSION = 1
MANIFEST = "manifest.json"


def write_manifest(index_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (a reader sees the old one or the new one, never half)."""
    p = Path(index_dir)
    tmp = p / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(p / MANIFEST)


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The parsed manifest of an index directory; ValueError if missing, unreadable or of another format."""
    p = Path(index_dir)
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{p} is not an index directory (no {MANIFEST}); build one with `floworacle index build`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{mpath} is not valid JSON ({exc}); rebuild the index") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{mpath} is not a Flow Oracle index manifest; rebuild the index")
    version = manifest.get("format_version")
    if version != INDEX_VERSION:
        raise ValueError(
            f"{p}: index format version {version} is not supported by this server (reads {INDEX_VERSION}); "
            "rebuild the index with this version of `floworacle index build`"
        )
    return manifest
