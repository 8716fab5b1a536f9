"""``floworacle index build`` and ``floworacle index info``: prepare and inspect index directories."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from floworacle.protocol import SPACES
from floworacle_server.data._formats import STORAGE_DTYPES
from floworacle_server.data._nearest_index import describe_entry

__all__ = ["register"]

_INDEX_HELP = (
    "train a faiss index over the {space} space: ivf (IVF-Flat) or ivfpq, optionally with parameters "
    "KIND:key=value,... (nlist, m, nbits, train, niter, nprobe, recall, rerank, queries, k, seed); its recall@k "
    "on held-out queries is measured and stored (see docs/data.md)"
)


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
    build.add_argument(
        "--features",
        help="(N, F) feature embeddings of the same samples (e.g. SSCD / DINO / CLIP), .npy or any data format; "
        "searched by nearest queries with space=features",
    )
    build.add_argument(
        "--features-metric", choices=("l2", "cosine"), default="l2", help="metric of the feature space (default l2)"
    )
    build.add_argument(
        "--image-shape",
        metavar="C,H,W",
        help="read each sample as a C x H x W image for the patch oracles (kind local / equivariant); default: the "
        "sample shape when it is 3-D",
    )
    build.add_argument(
        "--linear",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the data's Gaussian (mean and eigendecomposed covariance, overall and per class) for the linear "
        "oracle (default: when D <= 4096 and N D^2 <= 1e12; otherwise it is computed when first queried)",
    )
    build.add_argument(
        "--linear-rank", type=int, metavar="R", help="keep only the R largest eigenpairs of the Gaussian (large D)"
    )
    build.add_argument("--nearest-index", metavar="KIND[:PARAMS]", help=_INDEX_HELP.format(space="data"))
    build.add_argument("--features-index", metavar="KIND[:PARAMS]", help=_INDEX_HELP.format(space="feature"))
    build.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="split SRC: write OUT/train and OUT/heldout (named NAME-train, NAME-heldout), FRACTION of the samples "
        "held out; each part is an index directory with its own fingerprint (docs/data.md)",
    )
    build.add_argument(
        "--seed", type=int, help="seed of the --holdout split (default 0); the same seed, the same split"
    )
    build.set_defaults(func=_build)

    add = index_sub.add_parser(
        "add-nearest",
        help="train a faiss index for an existing index directory (replaces the space's index)",
        description=_add.__doc__,
    )
    add.add_argument("dir", help="index directory")
    add.add_argument("spec", metavar="KIND[:PARAMS]", help=_INDEX_HELP.format(space="chosen"))
    add.add_argument("--space", choices=tuple(SPACES), default="data", help="which vectors (default data)")
    add.add_argument("--verify", action="store_true", help="recompute the directory's fingerprints first")
    add.add_argument("--no-progress", action="store_true", help="no progress bars")
    add.set_defaults(func=_add)

    info = index_sub.add_parser("info", help="print an index directory's manifest")
    info.add_argument("dir", help="index directory")
    info.add_argument("--verify", action="store_true", help="also recompute the fingerprint and check it")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    """Validate SRC (and FEATURES), convert it to the storage dtype, write OUT, train the faiss
    indexes asked for and print the fingerprint. The index is written beside OUT and moved into
    place when complete (with the faiss indexes): an interrupted build leaves OUT as it was, and
    --force replaces an index (or an unfinished build's leftover) but no other files."""
    from floworacle_server.data._index import build_index

    entries: list[dict[str, Any]] = []
    try:
        if args.features_index and not args.features:
            raise ValueError("--features-index needs --features")
        if args.holdout is not None:
            return _build_split(args)
        if args.seed is not None:
            raise ValueError("--seed is the seed of a --holdout split; add --holdout FRACTION or drop --seed")
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
            features=args.features,
            features_metric=args.features_metric,
            # the faiss indexes go into the same commit: OUT gets the whole index or stays as it was
            before_commit=lambda tmp: entries.extend(_train_all(args, str(tmp))),
            image_shape=args.image_shape,
            linear=args.linear,
            linear_rank=args.linear_rank,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} is as it was before the build", file=sys.stderr)
        return 130
    _report(args.out, manifest, entries, args)
    print(manifest["fingerprint"])
    return 0


def _train_all(args: argparse.Namespace, out: str) -> list[dict[str, Any]]:
    entries = []
    for space, spec in (("data", args.nearest_index), ("features", args.features_index)):
        if spec:
            entries.append(_train(out, spec, space, progress=not args.no_progress))
    return entries


def _report(out: str, manifest: dict[str, Any], entries: list[dict[str, Any]], args: argparse.Namespace) -> None:
    shape = "x".join(str(s) for s in manifest["sample_shape"])
    print(
        f"wrote {out}: {manifest['name']!r}, {manifest['num_samples']} samples of shape {shape}, "
        f"{manifest['dtype']}, {manifest['num_classes']} classes"
        + (f", {manifest['features']['dim']} {manifest['features']['metric']} features" if args.features else "")
        + (f", image {'x'.join(map(str, manifest['image_shape']))}" if manifest.get("image_shape") else "")
        + (", Gaussian" + (f" of rank {g['rank']}" if g.get("rank") else "") if (g := manifest.get("gaussian")) else "")
    )
    for entry in entries:
        print(describe_entry(entry))


def _build_split(args: argparse.Namespace) -> int:
    """--holdout: OUT/train and OUT/heldout from one file; one line per part with its fingerprint."""
    from pathlib import Path

    from floworacle_server.data._split import SPLIT_PARTS, build_split_index

    manifests = build_split_index(
        args.src,
        args.out,
        fraction=args.holdout,
        seed=0 if args.seed is None else args.seed,
        labels=args.labels,
        weights=args.weights,
        features=args.features,
        name=args.name,
        scale_factor=args.scale_factor,
        dtype=args.dtype,
        progress=not args.no_progress,
        overwrite=args.force,
        features_metric=args.features_metric,
        image_shape=args.image_shape,
        linear=args.linear,
        linear_rank=args.linear_rank,
    )
    for part in SPLIT_PARTS:
        out = str(Path(args.out) / part)
        _report(out, manifests[part], _train_all(args, out), args)
        print(f"{part}: {manifests[part]['fingerprint']}")
    return 0


def _train(out: str, spec: str, space: str, *, progress: bool, verify: bool = False) -> dict[str, Any]:
    from floworacle_server.engine import build_nearest_index

    return build_nearest_index(out, spec, space=space, progress=progress, verify=verify)


def _add(args: argparse.Namespace) -> int:
    """Train a faiss index (IVF-Flat or IVF-PQ) for one space of DIR, measure its recall, store it."""
    try:
        entry = _train(args.dir, args.spec, args.space, progress=not args.no_progress, verify=args.verify)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe_entry(entry))
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
