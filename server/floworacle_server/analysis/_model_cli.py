"""``floworacle analyze model``: the model study (:mod:`floworacle.study`) on the command line,
in-process on a training and a held-out data set loaded here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from floworacle_server.analysis._cli_data import add_data_source, data_spec

__all__ = ["register_model"]


def register_model(asub: Any) -> None:
    """Add ``model`` to the ``analyze`` subcommands."""
    from floworacle.study import COPY_THRESHOLD, SWITCH_RATIO

    mo = asub.add_parser(
        "model",
        help="a velocity model against the training-set, held-out and leave-one-out oracles, and its copies",
        description=(
            "On a t grid, from training and from held-out samples (x_t = alpha_t x1 + sigma_t x0), the model's mean "
            "squared distance to the training-set oracle, the held-out oracle and the leave-one-out training oracle; "
            "the model's switch (first t where d_train < 1/2 d_heldout on training-sample queries); and the share of "
            "the model's samples (its ODE from noise) that copy a training sample (d1/d2 < 1/3) beside the same "
            "share for held-out samples. With --kinds, also per t the model's distance to the local, equivariant "
            "local and linear oracles over the training set and the kind it is closest to."
        ),
    )
    mo.add_argument(
        "--model",
        required=True,
        metavar="MODULE:CALLABLE",
        help="the velocity model (x_t, t) -> u, t = 0 noise: a torch module or a function, e.g. mypkg.nets:model "
        "or model.py:net (importing the module builds the model and loads its weights)",
    )
    add_data_source(
        mo,
        file_help="training data: a file (.npy/.npz/.safetensors/.pt) or an index directory",
        name_help="training data set name ('digits' is embedded) or path",
    )
    h = mo.add_mutually_exclusive_group(required=True)
    h.add_argument("--heldout", help="held-out data set name or path")
    h.add_argument("--heldout-data", help="held-out data: a file or an index directory")
    h.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="split the training data here instead (the split of `floworacle index build --holdout`)",
    )
    mo.add_argument("--holdout-seed", type=int, default=0, help="seed of --holdout (default 0)")
    mo.add_argument(
        "--inputs",
        choices=("auto", "torch", "numpy"),
        default="auto",
        help="what the model takes: torch tensors, float64 numpy arrays, or auto (torch for a torch module)",
    )
    mo.add_argument(
        "--convention",
        choices=("standard", "reversed"),
        default="standard",
        help="reversed: the model is called with s = 1 - t and predicts noise - data (SD3, Flux, diffusers)",
    )
    mo.add_argument("--t-grid", help="times: 'a,b,c', 'linspace:LO:HI:COUNT' or 'logit:LO:HI:COUNT' "
                    "(default linspace:0.02:0.98:25)")  # fmt: skip
    mo.add_argument("--queries-per-t", type=int, default=256, help="queries M per source (default 256)")
    mo.add_argument("--samples", type=int, default=1000, help="model samples for the copy test (default 1000)")
    mo.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    mo.add_argument("--method", choices=("euler", "midpoint", "heun"), default="midpoint", help="sampler")
    mo.add_argument("--shift", type=float, default=1.0, help="timestep shift of the sampler's grid (default 1)")
    mo.add_argument("--threshold", type=float, default=COPY_THRESHOLD, help="copy threshold on d1/d2 (default 1/3)")
    mo.add_argument(
        "--switch-ratio", type=float, default=SWITCH_RATIO, help="switch where d_train / d_heldout < this (default 0.5)"
    )
    mo.add_argument("--path", choices=("linear", "cosine"), default="linear", help="probability path (default linear)")
    mo.add_argument("--sigma-min", type=float, default=0.0, help="sigma_min of the linear path")
    mo.add_argument("--seed", type=int, default=0, help="seed of the queries and the sampler's noise")
    mo.add_argument(
        "--transition",
        action="store_true",
        help="also measure the training set's t_switch_50 / t_switch_99 (as `analyze transition` does) to compare",
    )
    mo.add_argument(
        "--mixed",
        metavar="T1,T2,...",
        help="also sample with the training-set oracle up to each switch time and the model after it (the seed "
        "paper's Fig. 5): per switch the share of copies and the distance to the nearest training sample "
        "(0 = the model alone, 1 = the oracle alone)",
    )
    mo.add_argument(
        "--kinds",
        help="also compare the model with these oracle kinds over the training set, per t: local, equivariant, "
        "linear, comma-separated, or 'all'; the report says which kind (global included) the model is closest to",
    )
    mo.add_argument(
        "--patch-size",
        default="3",
        help="patch size P of the local and equivariant kinds (odd), or a schedule T:P,T:P,... from t = 0, e.g. "
        "0:7,0.5:5,0.8:3 (default 3)",
    )
    mo.add_argument(
        "--kind-queries",
        type=int,
        default=64,
        help="queries per source and t for the kinds (default 64; the equivariant kind costs N (H W)^2 C P^2 "
        "multiply-adds per query)",
    )
    mo.add_argument("--json", help="write the report here")
    mo.add_argument("--plot", help="write the figure (PNG) here")
    mo.add_argument("--device", default="cpu", help="where to load the data (cpu, cuda, ...)")
    mo.add_argument("--no-progress", action="store_true", help="no progress bar")
    mo.set_defaults(func=_model_cmd)


def _load_pair(args: argparse.Namespace) -> tuple[Any, Any]:
    from floworacle_server.data import load_dataset, split_dataset

    train_spec = data_spec(args)
    if args.holdout is not None:
        return split_dataset(load_dataset(train_spec, device=args.device), args.holdout, args.holdout_seed)
    held_spec = data_spec(args, "heldout_data", "heldout")  # checked before anything loads
    train = load_dataset(train_spec, device=args.device)
    held = load_dataset(held_spec, device=args.device)
    return train, held


def _model_cmd(args: argparse.Namespace) -> int:
    """Load the data and the model, run the study, print its table, write JSON and PNG."""
    from tqdm import tqdm

    from floworacle.study import REFERENCE_KINDS, ModelStudy, StudyConfig, parse_patch_size, plot_model_study
    from floworacle_server.analysis._model import EngineData, load_model
    from floworacle_server.analysis._transition import DEFAULT_T_GRID, parse_t_grid, transition_curve

    try:
        from floworacle.paths import get_path

        path = get_path(args.path, args.sigma_min)
        grid: dict[str, Any] = {} if args.t_grid is None else {"t_grid": tuple(parse_t_grid(args.t_grid, path.t_max))}
        kinds: tuple[str, ...] = ()
        if args.kinds:
            kinds = (
                REFERENCE_KINDS if args.kinds == "all" else tuple(k.strip() for k in args.kinds.split(",") if k.strip())
            )
        config = StudyConfig(
            queries_per_t=args.queries_per_t,
            num_samples=args.samples,
            steps=args.steps,
            method=args.method,
            shift=args.shift,
            threshold=args.threshold,
            switch_ratio=args.switch_ratio,
            path=args.path,
            sigma_min=args.sigma_min,
            seed=args.seed,
            kinds=kinds,
            patch_size=parse_patch_size(args.patch_size),
            kind_queries=args.kind_queries,
            **grid,
        )
        config.validated()
        switches = None
        if args.mixed is not None:
            try:
                switches = [float(v) for v in args.mixed.split(",") if v.strip()]
            except ValueError:
                raise ValueError(
                    f"--mixed {args.mixed!r}: write comma-separated switch times, e.g. 0,0.2,0.5,1"
                ) from None
            if not switches or not all(0.0 <= v <= 1.0 for v in switches):
                raise ValueError(
                    f"--mixed {args.mixed!r}: switch times lie in [0, 1] (0 = the model alone, 1 = the oracle)"
                )
        model = load_model(args.model)
        train, held = _load_pair(args)
        with tqdm(desc="model study", unit="step", disable=args.no_progress) as bar:
            study = ModelStudy(EngineData(train), EngineData(held), config, progress=bar.update)
            bar.total = study.work_units + (len(switches) if switches else 0)
            report = study.run(model, inputs=args.inputs, convention=args.convention, name=args.model)
            mixed = None
            if switches:
                mixed = study.mixed(model, switches, inputs=args.inputs, convention=args.convention)
        out = report.to_json()
        if mixed is not None:
            out["mixed"] = mixed.to_json()
        data_switch = None
        if args.transition:
            curve = transition_curve(train, parse_t_grid(DEFAULT_T_GRID, path.t_max), path=path, seed=args.seed)
            data_switch = {"t_switch_50": curve.t_switch_50, "t_switch_99": curve.t_switch_99}
            out["data_switch"] = {**data_switch, "t_grid": DEFAULT_T_GRID, "queries_per_t": 256}
        print(report.summary())
        if mixed is not None:
            print()
            print(mixed.summary())
        if data_switch is not None:
            print(
                "data set's switch (analyze transition): "
                + ", ".join(f"{k} = {'never' if v is None else f'{v:.3f}'}" for k, v in data_switch.items())
            )
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
        if args.plot:
            plot_model_study(report, args.plot, data_switch=data_switch)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
