"""``floworacle index build`` and ``floworacle index info``: prepare and inspect index directories."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from floworacle_server.data._dataset import STORAGE_DTYPES

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``index`` command (``build``, ``info``) to the floworacle parser."""
    index = sub.add_parser("index", help="build or inspect a data set index directory")
    index_sub = index.add_subparsers(dest="index_command", required=True)

    build = index_sub.add_parser(
        "build", help="convert a data file into an index directory", description=_build.__doc__
    )
    build.add_argument("src", help="data file: .npy, .npz, .safetensors or .pt (shape (N, ...))")
    build.add_argument("out", help="output directory (created; must be new or empty unless --force)")
    build.add_argument("--labels", help="labels file (.npy, (N,) integers >= 0); overrides labels stored in SRC")
    build.add_argument("--weights", help="sample weights file (.npy, (N,) >= 0)")
    build.add_argument("--scale-factor", type=float, default=1.0, help="multiply samples by this before storage")
    build.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32", help="storage dtype")
    build.add_argument("--name", help="data set name (default: the output directory's name)")
    build.add_argument("--force", action="store_true", help="replace an existing index in OUT")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    info = index_sub.add_parser("info", help="print an index directory's manifest")
    info.add_argument("dir", help="index directory")
    info.add_argument("--verify", action="store_true", help="also recompute the fingerprint and check it")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    """Validate SRC, convert it to the storage dtype, write OUT and print the fingerprint."""
    from floworacle_server.data._index import build_index

    try:
        manifest = build_index(
            args.src,
            args.out,
            labels=args.labels,
            weights=args.weights,
            scale_factor=args.scale_factor,
            dtype=args.dtype,
            name=args.name,
            progress=not args.no_progress,
            overwrite=args.force,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = "x".join(str(s) for s in manifest["sample_shape"])
    print(
        f"wrote {args.out}: {manifest['name']!r}, {manifest['num_samples']} samples of shape {shape}, "
        f"{manifest['dtype']}, {manifest['num_classes']} classes"
    )
    print(manifest["fingerprint"])
    return 0


def _info(args: argparse.Namespace) -> int:
    from floworacle_server.data._index import load_index, read_manifest

    try:
        manifest = read_manifest(args.dir)
        if args.verify:
            load_index(args.dir, verify=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    if args.verify:
        print("fingerprint verified")
    return 0
