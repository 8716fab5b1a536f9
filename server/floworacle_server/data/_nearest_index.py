"""faiss indexes stored in an index directory, and the nearest-search facts a data set carries.

An index is trained and measured by :mod:`floworacle_server.engine._index_build`; this module
only writes its file with a manifest entry and loads it back. The entry records the fingerprint
of the vectors the index was built on (the data's, or the features') and the sha256 of the index
file: a loader refuses an index built for other vectors, or a file that changed.

A faiss index holds the vectors' ids in the caller's original order, so it does not depend on
how the server orders its rows.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from floworacle.protocol import SPACES
from floworacle_server.data._faiss import need_faiss
from floworacle_server.data._manifest import read_manifest, write_manifest

__all__ = [
    "DEFAULT_EXACT_NEAREST_MAX_SAMPLES",
    "NEAREST_SPACES",
    "BackendChoice",
    "NearestIndex",
    "describe_entry",
    "load_nearest_indexes",
    "write_nearest_index",
]

log = logging.getLogger(__name__)

#: Spaces a nearest query can search (the protocol's table).
NEAREST_SPACES: tuple[str, ...] = tuple(SPACES)
#: A nearest query that does not say ``exact`` is exact up to this many samples (else it uses an index).
DEFAULT_EXACT_NEAREST_MAX_SAMPLES = 1_000_000


@dataclass
class BackendChoice:
    """The exact screen chosen for one space of a data set ("torch" or "faiss") and why.

    ``torch_ms`` / ``faiss_ms`` are the calibration's best times and ``torch_over_faiss`` their
    ratio (> 1: faiss faster); None when not measured.
    """

    backend: str
    reason: str
    torch_ms: float | None = None
    faiss_ms: float | None = None
    torch_over_faiss: float | None = None


@dataclass
class NearestIndex:
    """A loaded faiss index over one space of a data set.

    Attributes:
        space: "data" or "features".
        kind: "ivf" (IVF-Flat) or "ivfpq".
        params: the faiss factory string, e.g. "IVF1024,Flat" or "IVF1024,PQ16x8".
        nlist: inverted lists.
        default_nprobe: lists probed when a query gives none.
        rerank: candidates fetched per wanted neighbour before the exact float64 re-ranking.
        recall: recall@recall_k at default_nprobe, measured at build time on held-out queries.
        recall_k: the k of that recall.
        device: "cpu" or "cuda" (a faiss GPU index).
        bytes: size of the index file (about its memory).
        index: the faiss index object (ids are the caller's sample indices).
        entry: the manifest entry (build parameters, the recall table by nprobe, ...).
    """

    space: str
    kind: str
    params: str
    nlist: int
    default_nprobe: int
    rerank: int
    recall: float
    recall_k: int
    device: str
    bytes: int
    index: Any = field(repr=False)
    entry: dict[str, Any] = field(default_factory=dict, repr=False)
    gpu_resources: Any = field(default=None, repr=False)
    #: a faiss GPU index takes nprobe as an attribute; searches that set it are serialised
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_entry(
        cls, entry: dict[str, Any], index: Any, device: str = "cpu", gpu_resources: Any = None
    ) -> NearestIndex:
        return cls(
            space=str(entry["space"]),
            kind=str(entry["kind"]),
            params=str(entry["params"]),
            nlist=int(entry["nlist"]),
            default_nprobe=int(entry["default_nprobe"]),
            rerank=int(entry["rerank"]),
            recall=float(entry["recall"]),
            recall_k=int(entry["recall_k"]),
            device=device,
            bytes=int(entry["bytes"]),
            index=index,
            entry=entry,
            gpu_resources=gpu_resources,
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _index_file(space: str, kind: str) -> str:
    return f"nearest-{space}-{kind}.faiss"


def write_nearest_index(index_dir: str | Path, index: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``index`` into ``index_dir`` and record ``entry`` (with file, bytes, sha256) in its manifest.

    One index per space: a new one replaces the space's previous entry. The faiss file is
    written first and the manifest replaced atomically, so an interrupted write leaves the old
    manifest valid.
    """
    faiss = need_faiss()
    p = Path(index_dir)
    manifest = read_manifest(p)
    name = _index_file(str(entry["space"]), str(entry["kind"]))
    tmp = p / (name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(p / name)
    full = {**entry, "file": name, "bytes": (p / name).stat().st_size, "file_sha256": _sha256_file(p / name)}
    kept = [e for e in manifest.get("nearest_indexes", []) if e.get("space") != entry["space"]]
    manifest["nearest_indexes"] = [*kept, full]
    write_manifest(p, manifest)
    return full


def _to_gpu(faiss: Any, index: Any, device: torch.device) -> tuple[Any, Any]:
    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # IVF-PQ lookup tables in half precision: needed for many sub-quantizers
    return faiss.index_cpu_to_gpu(res, device.index or 0, index, options), res


def load_nearest_indexes(
    index_dir: str | Path,
    manifest: dict[str, Any],
    fingerprints: dict[str, str],
    num_samples: int,
    dims: dict[str, int],
    *,
    device: torch.device,
    verify: bool = True,
) -> dict[str, NearestIndex]:
    """Load every index the manifest lists, checked against the vectors they must describe.

    Args:
        fingerprints: per space, the fingerprint of the vectors now loaded.
        dims: per space, the vectors' dimension.
        device: the data set's device: a CUDA data set gets faiss GPU indexes when the installed
            faiss has GPU support (else CPU indexes, logged).
        verify: also hash each index file against its recorded sha256.

    Raises:
        ValueError: an index built for other vectors (fingerprint), a changed or unreadable file,
            or one whose size or dimension disagrees with the data.
    """
    p = Path(index_dir)
    out: dict[str, NearestIndex] = {}
    for entry in manifest.get("nearest_indexes", []):
        space = str(entry.get("space"))
        if space not in fingerprints:
            raise ValueError(f"{p}: an index is listed for space {space!r}, which this data set lacks; rebuild it")
        if entry.get("fingerprint") != fingerprints[space]:
            raise ValueError(
                f"{p}: the {space} index {entry.get('file')} was built for vectors with fingerprint "
                f"{entry.get('fingerprint')}, but the {space} loaded now have {fingerprints[space]}; rebuild the index "
                "(floworacle index build ... --force with --nearest-index / --features-index)"
            )
        faiss = need_faiss()
        path = p / str(entry["file"])
        if verify and (not path.is_file() or _sha256_file(path) != entry.get("file_sha256")):
            raise ValueError(f"{path} is missing or does not match its recorded sha256; rebuild the index")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"{path}: cannot read the faiss index ({exc}); rebuild it") from exc
        if int(index.ntotal) != num_samples or int(index.d) != dims[space]:
            raise ValueError(
                f"{path} holds {index.ntotal} vectors of dimension {index.d}, the {space} space has {num_samples} "
                f"of dimension {dims[space]}; rebuild the index"
            )
        where, res = "cpu", None
        if device.type == "cuda":
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                try:
                    index, res = _to_gpu(faiss, index, device)
                    where = "cuda"
                except RuntimeError as exc:  # e.g. an IVF-PQ layout the GPU kernels do not support
                    log.warning("the %s index %s stays on the CPU: faiss GPU refused it (%s)", space, path.name, exc)
            else:
                log.info("the %s index %s runs on the CPU: this faiss build has no GPU support", space, path.name)
        out[space] = NearestIndex.from_entry(entry, index, where, res)
    return out


def describe_entry(entry: dict[str, Any]) -> str:
    """One line for ``floworacle index build`` / logs: kind, params, recall and default nprobe."""
    missed = "" if entry.get("recall_target_met", True) else f", below the target {entry.get('recall_target')}"
    return (
        f"{entry['space']} index {entry['params']}: recall@{entry['recall_k']} = {entry['recall']:.4f} at nprobe "
        f"{entry['default_nprobe']}{missed} ({entry.get('bytes', 0) / 2**20:.1f} MiB)"
    )
