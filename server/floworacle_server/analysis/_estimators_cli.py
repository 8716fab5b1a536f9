"""``floworacle analyze estimators``: the squared bias and variance of cheaper targets against the
exact one (:mod:`floworacle_server.analysis._estimators`) on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from floworacle_server.analysis._cli_data import add_data_source, data_spec

__all__ = ["register_estimators"]


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: write comma-separated integers, e.g. 64,256,1024") from None
    return out


def register_estimators(asub: Any) -> None:
    """Add ``estimators`` to the ``analyze`` subcommands."""
    from floworacle_server.analysis._estimators import DEFAULT_ESTIMATOR_GRID

    es = asub.add_parser(
        "estimators",
        help="squared bias and variance of cheaper targets (conditional, STF, minibatch, kNN) against the exact one",
        description=(
            "Per t, queries x_t = alpha_t x1 + sigma_t x0 from training samples and fresh noise; each estimator of the "
            "target is drawn R times given x_t (the own x1 of the conditional and STF targets from the exact "
            "posterior) and compared with the exact oracle: squared bias and variance per dimension in velocity "
            "space, divided by S(t), the exact velocity's per-dimension variance over the queries at t. Estimators: "
            "the conditional target d_alpha x1 + d_sigma x0; STF (own x1 + n - 1 others) and minibatch (n fresh "
            "samples) self-normalised targets; nearest neighbours (k, exact search or the faiss index) plus a "
            "uniform tail of m samples (Niedoba et al. 2024). Cost: rows read per query / N."
        ),
    )
    add_data_source(es)
    es.add_argument("--path", choices=("linear", "cosine"), default="linear", help="probability path (default linear)")
    es.add_argument("--sigma-min", type=float, default=0.0, help="sigma_min of the linear path")
    es.add_argument("--t-grid", default=DEFAULT_ESTIMATOR_GRID,
                    help=f"times: 'a,b,c', 'linspace:LO:HI:COUNT' or 'logit:LO:HI:COUNT' (default {DEFAULT_ESTIMATOR_GRID})")  # fmt: skip
    es.add_argument("--queries-per-t", type=int, default=256, help="queries M per t (same M pairs at every t)")
    es.add_argument("--replicates", type=int, default=16, help="draws R of each estimator per query (default 16)")
    es.add_argument("--batch-sizes", default="64,256,1024", help="reference batch sizes n of STF and minibatch")
    es.add_argument("--knn", default="16,128", help="neighbour counts k of the kNN estimator (default 16,128)")
    es.add_argument(
        "--knn-tail", type=int, default=128, help="uniform tail samples m of the kNN estimator (default 128)"
    )
    es.add_argument("--knn-search", choices=("exact", "index"), default="exact",
                    help="the neighbours: exact search, or the data set's faiss index (`index build --nearest-index`)")  # fmt: skip
    es.add_argument("--nprobe", type=int, help="inverted lists an index search probes (default: the index's)")
    es.add_argument("--seed", type=int, default=0, help="seed of the queries and the draws")
    es.add_argument("--address", "--server", dest="address",
                    help="take the exact target and the neighbours from a running server at ADDRESS (host:port), "
                    "pinned to the local data set's fingerprint")  # fmt: skip
    es.add_argument("--server-dataset", help="the server's name for the data set (default: the local name)")
    es.add_argument("--json", help="write the result here")
    es.add_argument("--plot", help="write bias and variance against t (PNG) here")
    es.add_argument("--device", default="cpu", help="in-process: where to load the data (cpu, cuda, ...)")
    es.add_argument("--no-progress", action="store_true", help="no progress bar")
    es.set_defaults(func=_estimators_cmd)


def _estimators_cmd(args: argparse.Namespace) -> int:
    """Measure, print both tables, write JSON and PNG."""
    from tqdm import tqdm

    from floworacle import OracleError
    from floworacle.paths import get_path
    from floworacle_server.analysis._estimators import (
        ExactSource,
        client_source,
        default_specs,
        estimator_study,
        plot_estimators,
    )
    from floworacle_server.analysis._transition import parse_t_grid
    from floworacle_server.data import load_dataset

    client = None
    try:
        path = get_path(args.path, args.sigma_min)
        t_grid = parse_t_grid(args.t_grid, path.t_max)
        if t_grid[0] <= 0.0:
            raise ValueError("the t grid must start above 0: at t = 0 every estimator is the data mean")
        specs = default_specs(_ints(args.batch_sizes, "--batch-sizes"), _ints(args.knn, "--knn"), args.knn_tail)
        ds = load_dataset(data_spec(args), device=args.device)
        source: ExactSource | None = None
        if args.address:
            from floworacle import OracleClient

            client = OracleClient(args.address)
            source = client_source(
                client, args.server_dataset or ds.name, path=args.path, sigma_min=args.sigma_min,
                fingerprint=ds.fingerprint,
            )  # fmt: skip
        with tqdm(total=t_grid.size, desc="estimators", unit="t", disable=args.no_progress) as bar:
            report = estimator_study(
                ds, t_grid, specs=specs, path=path, queries_per_t=args.queries_per_t, replicates=args.replicates,
                seed=args.seed, search=args.knn_search, nprobe=args.nprobe, source=source, progress=bar.update,
            )  # fmt: skip
        print(report.summary())
        if args.json:
            out = {**report.to_json(), "t_grid": args.t_grid}
            Path(args.json).write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
        if args.plot:
            plot_estimators(report, args.plot)
    except (ValueError, OracleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
    return 0
