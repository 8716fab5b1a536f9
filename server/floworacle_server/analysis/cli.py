"""``floworacle analyze transition | advice | memorization | model | estimators | kinds``: the analysis tools on the
command line.

Each command works in-process on a data set it loads (``--data`` / ``--dataset`` / ``--synthetic``);
``transition`` and ``advice`` can instead query a running server (``--server``). Results go to
stdout as a table, to ``--json`` and to PNG plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from floworacle_server.analysis._cli_data import add_data_source, data_spec

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``analyze`` command and its subcommands to the floworacle parser."""
    analyze = sub.add_parser(
        "analyze", help="transition curves, sampling advice, memorisation reports, model studies, oracle kinds"
    )
    asub = analyze.add_subparsers(dest="analysis", required=True)

    tr = asub.add_parser(
        "transition",
        help="the navigation -> refinement switch of a data set's posterior along t",
        description=(
            "Build queries x_t = alpha_t x1 + sigma_t x0 from training samples x1 and fresh noise x0 on a t grid "
            "and measure per t the top-1 posterior weight, entropy, effective sample size and the gap between "
            "the oracle velocity and the conditional target; report t_switch_50 / t_switch_99 (mean top-1 "
            "reaching 0.5 / 0.99)."
        ),
    )
    _data_options(tr, with_from=False)
    _transition_options(tr)
    tr.set_defaults(func=_transition_cmd)

    ad = asub.add_parser(
        "advice",
        help="timestep shift and guidance interval from the switch time",
        description=(
            "From a transition result (--from JSON, or measured now from the data options): the shift s in "
            "t' = s u / (1 + (s - 1) u) that puts --share of uniformly spaced steps u before the switch, "
            "s = t_s (1 - share) / (share (1 - t_s)), and the guidance interval [t_s, --guidance-end]."
        ),
    )
    _data_options(ad, with_from=True)
    _transition_options(ad)
    ad.add_argument("--share", type=float, default=0.5, help="share of sampling steps before the switch (0..1)")
    ad.add_argument("--steps", type=int, default=50, help="sampling steps K, for the step counts (default 50)")
    ad.add_argument(
        "--switch",
        choices=("99", "50"),
        default="99",
        help="anchor at t_switch_99 (default: the posterior has collapsed, navigation is over) or t_switch_50",
    )
    ad.add_argument("--guidance-end", type=float, default=1.0, help="t_hi of the guidance interval (default 1)")
    ad.set_defaults(func=_advice_cmd)

    me = asub.add_parser(
        "memorization",
        help="nearest training samples of generated samples; copies by the d1/d2 ratio",
        description=(
            "For each generated sample the nearest and second-nearest training samples (exact L2), d1, d2 and "
            "d1/d2; a sample with d1/d2 < --threshold is counted as a copy. With --features, also the feature-space "
            "test: the top-1 cosine similarity of each generated sample's features to the training features (mean, "
            "p50/p75/p90/p95, share above --similarity-threshold) beside a train-to-train leave-one-out baseline."
        ),
    )
    me.add_argument("--samples", help="generated samples: .npy, .npz, .safetensors or .pt, (B, ...)")
    me.add_argument(
        "--features",
        help="(B, F) feature embeddings of the generated samples (same embedding model as the training features)",
    )
    me.add_argument(
        "--train-features",
        help="(N, F) training features when the data are not an index built with --features",
    )
    me.add_argument(
        "--train-features-metric", choices=("l2", "cosine"), default="cosine", help="metric of --train-features"
    )
    me.add_argument(
        "--similarity-threshold",
        type=float,
        help="feature test: flag top-1 cosine similarity above this (default 0.5); for l2 features, d1/d2 below it "
        "(default 1/3)",
    )
    me.add_argument(
        "--baseline-samples", type=int, default=10_000, help="training samples in the baseline (default 10,000)"
    )
    me.add_argument("--seed", type=int, default=0, help="seed of the baseline's training samples")
    me.add_argument("--nprobe", type=int, help="feature test through the features index at this nprobe (approximate)")
    me.add_argument("--features-plot", help="write the feature-space histogram (PNG) here, baseline beside it")
    add_data_source(me, file_help="training data file or index directory")
    me.add_argument("--threshold", type=float, default=1.0 / 3.0, help="copy threshold on d1/d2 (default 1/3)")
    me.add_argument("--json", help="write the report here")
    me.add_argument("--plot", help="write a histogram of d1/d2 (PNG) here")
    me.add_argument("--grid", help="write a PNG grid of samples beside their nearest training images (image data)")
    me.add_argument("--grid-count", type=int, default=12, help="samples in the grid, lowest d1/d2 first (default 12)")
    me.add_argument("--image-shape", help="H,W or C,H,W to draw flat samples as images (default: from the data)")
    me.add_argument("--device", default="cpu", help="where to load the training data (cpu, cuda, ...)")
    me.set_defaults(func=_memorization_cmd)

    from floworacle_server.analysis._kinds_cli import register_kinds
    from floworacle_server.analysis._model_cli import register_model

    register_model(asub)
    register_kinds(asub)

    from floworacle_server.analysis._estimators_cli import register_estimators

    register_estimators(asub)


def _data_options(p: argparse.ArgumentParser, *, with_from: bool) -> None:
    g = add_data_source(p)
    if with_from:
        g.add_argument("--from", dest="from_json", help="a JSON written by `floworacle analyze transition --json`")
    g.add_argument(
        "--synthetic",
        action="append",
        metavar="N:D",
        help="unit-Gaussian data with N samples in D dimensions; repeat for a sweep drawn in one plot",
    )


def _transition_options(p: argparse.ArgumentParser) -> None:
    from floworacle_server.analysis._transition import DEFAULT_T_GRID

    p.add_argument("--path", choices=("linear", "cosine"), default="linear", help="probability path (default linear)")
    p.add_argument("--sigma-min", type=float, default=0.0, help="sigma_min of the linear path")
    p.add_argument("--per-class", action="store_true", help="also one curve per class (class-conditional oracle)")
    p.add_argument(
        "--t-grid",
        default=DEFAULT_T_GRID,
        help=f"times: 'a,b,c', 'linspace:LO:HI:COUNT' or 'logit:LO:HI:COUNT' (default {DEFAULT_T_GRID})",
    )
    p.add_argument(
        "--queries-per-t",
        type=int,
        default=None,
        help="queries M per t (same M pairs at every t); default: adaptive, from 128 queries until each switch "
        "time's bootstrap standard error is at most --target-se (at most --max-queries)",
    )
    p.add_argument(
        "--target-se",
        type=float,
        default=None,
        help="standard error the adaptive query count aims at for each switch time (default 0.005: a 95%% "
        "interval of about +-0.01)",
    )
    p.add_argument("--max-queries", type=int, default=None, help="most queries of the adaptive count (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the queries and of synthetic data")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--plot", help="write the curves (PNG) here")
    p.add_argument("--server", help="query a running server at ADDRESS (host:port) instead of in-process")
    p.add_argument("--server-dataset", help="the server's name for the data set (default: the local name)")
    p.add_argument("--device", default="cpu", help="in-process: where to load the data (cpu, cuda, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _write_json(path: str | Path, obj: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")


def _measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any]]:
    """Run the transition measurement the arguments describe; (JSON dict, curves)."""
    from tqdm import tqdm

    from floworacle.paths import get_path
    from floworacle_server.analysis._transition import (
        DEFAULT_MAX_QUERIES,
        DEFAULT_START_QUERIES,
        DEFAULT_TARGET_SE,
        Evaluator,
        client_evaluator,
        engine_evaluator,
        parse_synthetic,
        parse_t_grid,
        synthetic_dataset,
        transition_curve,
    )
    from floworacle_server.data import Dataset, load_dataset

    path = get_path(args.path, args.sigma_min)
    t_grid = parse_t_grid(args.t_grid, path.t_max)
    adaptive = args.queries_per_t is None
    if not adaptive and (args.target_se is not None or args.max_queries is not None):
        raise ValueError("--target-se and --max-queries set the adaptive query count; drop them or --queries-per-t")
    start = DEFAULT_START_QUERIES if adaptive else args.queries_per_t
    target_se = (args.target_se if args.target_se is not None else DEFAULT_TARGET_SE) if adaptive else None
    max_queries = args.max_queries if args.max_queries is not None else DEFAULT_MAX_QUERIES
    if start < 1:
        raise ValueError(f"--queries-per-t must be >= 1, got {args.queries_per_t}")
    if target_se is not None and not target_se > 0:
        raise ValueError(f"--target-se must be > 0, got {args.target_se}")
    if adaptive and max_queries < start:
        raise ValueError(f"--max-queries must be >= {start}, got {max_queries}")
    datasets: list[Dataset]
    if args.synthetic:
        if args.server:
            raise ValueError("--synthetic data exist only in this process; drop --server")
        if args.per_class:
            raise ValueError("--synthetic data have no classes; drop --per-class")
        datasets = [synthetic_dataset(n, d, args.seed, args.device) for n, d in parse_synthetic(args.synthetic)]
    else:
        datasets = [load_dataset(data_spec(args), device="cpu" if args.server else args.device)]

    plan: list[tuple[Dataset, int | None]] = []
    for ds in datasets:
        plan.append((ds, None))
        if args.per_class:
            if ds.num_classes == 0:
                raise ValueError(f"data set {ds.name!r} has no labels; drop --per-class or load it with labels")
            plan.extend((ds, y) for y in range(ds.num_classes) if ds.class_rows(y)[1] > ds.class_rows(y)[0])

    client = None
    if args.server:
        from floworacle import OracleClient

        client = OracleClient(args.server)
    try:
        curves = []
        with tqdm(total=len(plan) * t_grid.size, desc="transition", unit="t", disable=args.no_progress) as bar:
            for ds, label in plan:
                ev: Evaluator
                if client is not None:
                    ev = client_evaluator(
                        client,
                        args.server_dataset or ds.name,
                        path=args.path,
                        sigma_min=args.sigma_min,
                        fingerprint=ds.fingerprint,
                    )
                else:
                    ev = engine_evaluator(ds)
                bar.set_postfix_str(ds.name if label is None else f"{ds.name} class {label}")
                curves.append(
                    transition_curve(
                        ds,
                        t_grid,
                        path=path,
                        queries_per_t=start,
                        seed=args.seed,
                        label=label,
                        evaluator=ev,
                        progress=bar.update,
                        target_se=target_se,
                        max_queries=max_queries,
                    )
                )
    finally:
        if client is not None:
            client.close()
    result = {
        "kind": "transition",
        "path": args.path,
        "sigma_min": args.sigma_min,
        "seed": args.seed,
        "queries_per_t": args.queries_per_t,  # null: adaptive (each data set's "queries" says how many)
        "target_se": target_se,
        "max_queries": max_queries if adaptive else None,
        "t_grid": args.t_grid,
        "source": f"server {args.server}" if args.server else "in-process",
        "definitions": _DEFINITIONS,
        "datasets": [c.to_json() for c in curves],
    }
    return result, curves


_DEFINITIONS = {
    "queries": "x_t = alpha_t x1 + sigma_t x0, x1 a training sample (in the data set: training-set posterior), "
    "x0 ~ N(0, I); the same M pairs at every t",
    "top1": "max_i gamma_i",
    "entropy": "-sum_i gamma_i log gamma_i (nats)",
    "ess": "1 / sum_i gamma_i^2",
    "gap": "||u_oracle - (d_alpha x1 + d_sigma x0)||^2 / D",
    "stats": "mean, std (population) and quantiles q10, q50, q90 over the M queries at each t",
    "t_switch_50": "first t where mean top-1 >= 0.5 (linear interpolation on the grid; null if never)",
    "t_switch_99": "first t where mean top-1 >= 0.99 (linear interpolation on the grid; null if never)",
    "uncertainty": "per switch time, a bootstrap over the M queries (400 resamples): se (standard deviation of the "
    "resampled switch times), lo / hi (2.5 % / 97.5 % quantiles; hi null when over 2.5 % of the resamples never "
    "reach the level), never (share of resamples that never reach it)",
    "M": 'the "queries" of an entry: how many queries per t its curves average over',
}


def _print_switch_table(curves: list[Any]) -> None:
    rows = [("data set", "N", "D", "M", "t_switch_50 +- se", "t_switch_99 +- se", "95% interval of t_switch_99")]
    for c in curves:
        u99 = c.uncertainty.get("t_switch_99")
        interval = "-" if u99 is None else f"[{_fmt(u99.lo)}, {'beyond the grid' if u99.hi is None else _fmt(u99.hi)}]"
        rows.append(
            (
                c.name,
                str(c.num_samples),
                str(c.dim),
                str(c.queries),
                _fmt_se(c.t_switch_50, c.uncertainty.get("t_switch_50")),
                _fmt_se(c.t_switch_99, u99),
                interval,
            )
        )
    from floworacle.study import text_table

    print(text_table(rows, left=True))


def _fmt(v: float | None) -> str:
    return "never" if v is None else f"{v:.3f}"


def _fmt_se(v: float | None, u: Any) -> str:
    """A switch time with its bootstrap standard error, to the digits that carry information."""
    if v is None:
        return "never"
    if u is None or u.se is None:
        return f"{v:.3f} +- ?"
    return f"{v:.3f} +- {u.se:.3f}"


def _transition_cmd(args: argparse.Namespace) -> int:
    """Measure the curves, print the switch times, write JSON and plot."""
    from floworacle import OracleError
    from floworacle_server.analysis._plots import plot_transition

    try:
        result, curves = _measure(args)
        _print_switch_table(curves)
        if args.json:
            _write_json(args.json, result)
        if args.plot:
            plot_transition(curves, args.plot)
    except (ValueError, OracleError) as exc:
        return _error(str(exc))
    return 0


def _advice_cmd(args: argparse.Namespace) -> int:
    """Advice from --from JSON or from a fresh measurement; print the table and store it under "advice"."""
    from floworacle import OracleError
    from floworacle_server.analysis._advice import advise, format_advice_table
    from floworacle_server.analysis._plots import plot_transition
    from floworacle_server.analysis._transition import TransitionCurve

    try:
        if args.from_json:
            try:
                result = json.loads(Path(args.from_json).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read --from {args.from_json}: {exc}") from None
            if not isinstance(result, dict) or not isinstance(result.get("datasets"), list):
                raise ValueError(f"{args.from_json} is not a transition result (no 'datasets' list)")
            curves = [TransitionCurve.from_json(e) for e in result["datasets"]]
        else:
            result, curves = _measure(args)
            _print_switch_table(curves)
            print()
        advice = [
            advise(c, share=args.share, steps=args.steps, switch=args.switch, guidance_end=args.guidance_end)
            for c in curves
        ]
        print(format_advice_table(advice))
        result["advice"] = [a.to_json() for a in advice]
        out = args.json or args.from_json
        if out:
            _write_json(out, result)
        if args.plot:
            plot_transition(curves, args.plot)
    except (ValueError, OracleError) as exc:
        return _error(str(exc))
    return 0


def _memorization_cmd(args: argparse.Namespace) -> int:
    """Nearest training samples of each generated sample, copy flags, JSON, histogram and image grid;
    with --features the feature-space test beside it."""
    import numpy as np

    from floworacle_server.analysis._memorization import (
        feature_memorization_report,
        image_shape_for,
        load_samples,
        memorization_report,
        training_rows,
    )
    from floworacle_server.analysis._plots import plot_copy_grid, plot_ratio_histogram
    from floworacle_server.data import load_dataset

    try:
        spec = data_spec(args)
        if args.samples is None and args.features is None:
            raise ValueError("give --samples (pixel test), --features (feature-space test) or both")
        if args.samples is None and (args.plot or args.grid):
            raise ValueError("--plot and --grid draw the pixel test: give --samples")
        if args.features is None and (args.features_plot or args.train_features or args.nprobe is not None):
            raise ValueError(
                "--features-plot, --train-features and --nprobe belong to the feature test: give --features"
            )
        if args.grid_count < 1:
            raise ValueError(f"--grid-count must be >= 1, got {args.grid_count}")
        override = None
        if args.image_shape:
            try:
                override = tuple(int(v) for v in args.image_shape.split(","))
            except ValueError:
                raise ValueError(f"--image-shape {args.image_shape!r}: write H,W or C,H,W") from None
        ds = load_dataset(
            spec, device=args.device, features=args.train_features, features_metric=args.train_features_metric
        )
        out: dict[str, Any] = {
            "kind": "memorization",
            "dataset": ds.name,
            "fingerprint": ds.fingerprint,
            "N": ds.num_samples,
            "D": ds.dim,
        }
        samples = None
        report = None
        if args.samples is not None:
            samples = load_samples(args.samples)
            report = memorization_report(ds, samples, args.threshold)
            print(
                f"{report.d1.size} samples against {ds.name} (N = {ds.num_samples}, D = {ds.dim}): "
                f"{int(report.copy.sum())} copies (d1/d2 < {report.threshold:.4g}), copy_fraction = "
                f"{report.copy_fraction:.4f}; median d1/d2 = {float(np.median(report.ratio)):.3f}"
            )
            out = report.to_json(**out, samples_file=str(args.samples))
        if args.features is not None:
            gen = load_samples(args.features)
            if samples is not None and gen.shape[0] != samples.shape[0]:
                raise ValueError(
                    f"--features has {gen.shape[0]} rows but --samples has {samples.shape[0]}: give one feature row per "
                    "generated sample"
                )
            frep = feature_memorization_report(
                ds,
                gen,
                threshold=args.similarity_threshold,
                baseline_samples=args.baseline_samples,
                seed=args.seed,
                nprobe=args.nprobe,
            )
            _print_feature_table(frep)
            out["features"] = {**frep.to_json(), "features_file": str(args.features), "feature_dim": ds.feature_dim}
            if args.features_plot:
                from floworacle_server.analysis._feature_plots import plot_feature_histogram

                plot_feature_histogram(frep, args.features_plot)
        if args.json:
            _write_json(args.json, out)
        if report is not None and args.plot:
            plot_ratio_histogram(report, args.plot)
        if report is not None and samples is not None and args.grid:
            shape = image_shape_for(ds, override)
            if shape is None:
                raise ValueError(
                    f"data set {ds.name!r} (sample shape {ds.sample_shape}) is not image-shaped; "
                    "pass --image-shape H,W or C,H,W"
                )
            order = np.argsort(report.ratio, kind="stable")[: args.grid_count]
            flat = samples.reshape(samples.shape[0], -1)
            plot_copy_grid(
                flat[order],
                training_rows(ds, report.nearest[order, 0]),
                training_rows(ds, report.nearest[order, 1]),
                report,
                order,
                shape,
                args.grid,
            )
    except ValueError as exc:
        return _error(str(exc))
    return 0


def _print_feature_table(rep: Any) -> None:
    """Mean and percentiles of the top-1 score and the flagged share, generated against the baseline."""
    from floworacle_server.analysis._memorization import PERCENTILES

    js = rep.to_json()
    head = ["", "count", "mean", *[f"p{q}" for q in PERCENTILES], "share"]
    rows = [head]
    for label, key in (("generated", "generated"), ("train-to-train", "train_baseline")):
        s = js[key]
        rows.append(
            [label, str(s["count"])]
            + [("-" if s[c] is None else f"{s[c]:.4f}") for c in ["mean", *[f"p{q}" for q in PERCENTILES]]]
            + [f"{s['share']:.4f}"]
        )
    print(
        f"feature space ({rep.metric}{', approximate' if rep.approximate else ''}): {rep.score_name}; share = {rep.rule}"
    )
    from floworacle.study import text_table

    print(text_table(rows, left=True))
