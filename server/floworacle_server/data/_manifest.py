"""The manifest of an index directory (``manifest.json``): its format tag and version, read and
written atomically. The layout it describes is :mod:`._index`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from floworacle_server.data._formats import STORAGE_DTYPES, unreadable

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
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{mpath} is not valid JSON ({exc}); rebuild the index") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else unreadable(mpath, exc)
        raise ValueError(f"{p}: cannot read the manifest {MANIFEST}: {reason}; rebuild the index") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{mpath} is not a Flow Oracle index manifest; rebuild the index")
    version = manifest.get("format_version")
    if version != INDEX_VERSION:
        raise ValueError(
            f"{p}: index format version {version} is not supported by this server (reads {INDEX_VERSION}); "
            "rebuild the index with this version of `floworacle index build`"
        )
    _check_manifest(mpath, manifest)
    return manifest


def _is_int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _check_manifest(mpath: Path, m: dict[str, Any]) -> None:
    """The fields :func:`load_index` reads are there and of the right kind, so that an edited or
    truncated manifest is refused in one line instead of failing deep inside the load.

    Raises:
        ValueError: naming the first missing or malformed field.
    """

    def need(key: str) -> Any:
        if key not in m:
            raise ValueError(f"{mpath}: the manifest has no {key!r}; it is incomplete or was edited, rebuild the index")
        return m[key]

    def bad(key: str, what: str) -> ValueError:
        shown = repr(m[key])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ValueError(f"{mpath}: the manifest's {key!r} must be {what}, found {shown}; rebuild the index")

    if not isinstance(need("name"), str):
        raise bad("name", "a string")
    if need("dtype") not in STORAGE_DTYPES:
        raise bad("dtype", f"one of {sorted(STORAGE_DTYPES)}")
    if not _is_int(need("num_samples"), 1):
        raise bad("num_samples", "an integer >= 1 (a data set of no samples cannot be served)")
    shape = need("sample_shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(d, 1) for d in shape):
        raise bad("sample_shape", "a non-empty list of integers >= 1, e.g. [64] or [4, 32, 32]")
    scale = need("scale_factor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale) or scale == 0:
        raise bad("scale_factor", "a finite non-zero number")
    if not isinstance(need("fingerprint"), str) or not m["fingerprint"]:
        raise bad("fingerprint", "the sha256 fingerprint string")
    if not isinstance(need("has_labels"), bool):
        raise bad("has_labels", "true or false")
    if m["has_labels"] and not _is_int(need("num_classes"), 1):
        raise bad("num_classes", "an integer >= 1 when the index has labels")
    if "has_weights" in m and not isinstance(m["has_weights"], bool):
        raise bad("has_weights", "true or false")
    files = m.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, (str, type(None))) for v in files.values()):
        raise bad("files", "a mapping of file roles to file names")
    features = m.get("features")
    if features is not None:
        if (
            not isinstance(features, dict)
            or not _is_int(features.get("dim"), 1)
            or features.get("metric") not in ("l2", "cosine")
            or not isinstance(features.get("fingerprint"), str)
        ):
            raise bad("features", "a section with dim (>= 1), metric (l2 or cosine) and fingerprint")
        if not isinstance(need("data_fingerprint"), str):
            raise bad("data_fingerprint", "the samples' own sha256 fingerprint string")
