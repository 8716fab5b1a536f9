"""``floworacle analyze kinds``: the oracle kinds side by side on one data set (:mod:`._kinds`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from floworacle_server.analysis._cli_data import add_data_source, data_spec

__all__ = ["register_kinds"]


def register_kinds(asub: Any) -> None:
    """Add ``kinds`` to the ``analyze`` subcommands."""
    ki = asub.add_parser(
        "kinds",
        help="samples of the global, local, equivariant local and linear oracles, and how many copy the data",
        description=(
            "Integrate each oracle kind's velocity from the same noise (t = 0) to data (t = 1) and test the samples "
            "for copies of training samples (d1/d2 < --threshold against the nearest and second-nearest training "
            "sample): the exact (global) oracle copies, the local, equivariant local (patch) and linear (Gaussian) "
            "oracles make new samples. Prints a table, writes --json, a grid of samples per kind (--plot) and the "
            "samples themselves (--save-samples DIR, one .npy per kind, for `analyze memorization`)."
        ),
    )
    add_data_source(ki)
    ki.add_argument("--image-shape", help="C,H,W of the samples for the patch kinds when the data declare none")
    ki.add_argument(
        "--kinds", default="global,local,equivariant,linear", help="comma-separated kinds (default all four)"
    )
    ki.add_argument(
        "--patch-size", default="3", help="P of the patch kinds (odd), or a schedule T:P,T:P,... from t = 0 (default 3)"
    )
    ki.add_argument("--samples", type=int, default=16, help="samples per kind (default 16)")
    ki.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    ki.add_argument("--method", choices=("euler", "midpoint", "heun"), default="euler", help="sampler (default euler)")
    ki.add_argument("--shift", type=float, default=1.0, help="timestep shift of the sampler's grid (default 1)")
    ki.add_argument("--path", choices=("linear", "cosine"), default="linear", help="probability path (default linear)")
    ki.add_argument("--threshold", type=float, default=1.0 / 3.0, help="copy threshold on d1/d2 (default 1/3)")
    ki.add_argument("--seed", type=int, default=0, help="seed of the noise")
    ki.add_argument("--json", help="write the report here")
    ki.add_argument("--plot", help="write a grid of samples per kind (PNG) here")
    ki.add_argument("--grid-count", type=int, default=10, help="samples per kind in the grid (default 10)")
    ki.add_argument("--save-samples", metavar="DIR", help="write each kind's samples to DIR/KIND.npy")
    ki.add_argument("--device", default="cpu", help="where to load the data (cpu, cuda, ...)")
    ki.set_defaults(func=_kinds_cmd)


def _kinds_cmd(args: argparse.Namespace) -> int:
    """Sample every kind, test the samples for copies, print, write JSON / PNG / samples."""
    import numpy as np

    from floworacle.study import parse_patch_size
    from floworacle_server.analysis._kinds import kinds_json, kinds_table, plot_kind_grid, sample_kinds
    from floworacle_server.data import load_dataset
    from floworacle_server.engine import KINDS

    try:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"--kinds {args.kinds!r}: use some of {', '.join(KINDS)}")
        spec = data_spec(args)
        patch = parse_patch_size(args.patch_size)
        ds = load_dataset(spec, device=args.device, image_shape=args.image_shape)
        print(
            f"{ds.name}: N = {ds.num_samples}, D = {ds.dim}, image {ds.image_shape}; {args.samples} samples per kind, "
            f"{args.method} {args.steps} steps, patch size {args.patch_size}"
        )

        def tell(kind: str) -> None:
            print(f"  sampling {kind} ...", file=sys.stderr, flush=True)

        results = sample_kinds(
            ds, kinds, num_samples=args.samples, steps=args.steps, method=args.method, shift=args.shift,
            path=args.path, patch_size=patch, seed=args.seed, threshold=args.threshold, progress=tell,
        )  # fmt: skip
        print(kinds_table(results))
        info = {
            "samples": args.samples,
            "sampler": {"method": args.method, "steps": args.steps, "shift": args.shift},
            "path": args.path,
            "patch_size": patch if isinstance(patch, int) else [list(p) for p in patch],
            "seed": args.seed,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(kinds_json(results, ds, **info), indent=1) + "\n")
        if args.save_samples:
            out = Path(args.save_samples)
            out.mkdir(parents=True, exist_ok=True)
            for kind, r in results.items():
                np.save(out / f"{kind}.npy", r.samples.astype(np.float32))
        if args.plot:
            if ds.image_shape is None:
                raise ValueError(f"data set {ds.name!r} has no image shape to draw; pass --image-shape C,H,W")
            plot_kind_grid(results, ds, ds.image_shape, args.plot, count=args.grid_count)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
