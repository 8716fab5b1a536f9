"""The oracle over a gang's shards equals the single-process oracle: 2 and 3 real gloo ranks on the
CPU, each holding its shard (make_shard), the partials merged with torch.distributed collectives
(the engine's CollectiveMerge over the service's Gang), every output within 1e-12 relative of the whole data
set's answer, for plain, class-conditional, guided, leave-one-out and fast queries, with sample
weights, and a refusal that one shard alone raises refused by every rank alike."""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from floworacle.paths import get_path
from floworacle_server.data import Dataset, ShardSpec, make_shard
from floworacle_server.engine import Guidance, OracleQuery, oracle

ALL = ("velocity", "x1_hat", "eps_hat", "score", "topk", "entropy", "ess", "variance")


def _data(weighted: bool) -> Dataset:
    rng = np.random.default_rng(11)
    n, d = 300, 12
    labels = rng.integers(0, 5, n)
    centers = rng.standard_normal((5, d)) * 2
    x = (centers[labels] + 0.7 * rng.standard_normal((n, d))).astype(np.float32)
    weights = rng.uniform(0.2, 1.0, n) if weighted else None
    if weighted:
        weights[labels == 4] = 0.0  # a class of weight 0: refused, like a single process does
    return Dataset.from_arrays("g", x, labels, weights)


def _queries(ds: Dataset, kind: str) -> OracleQuery:
    rng = np.random.default_rng(3)
    b = 24
    t = np.concatenate([np.linspace(0.02, 0.98, b - 2), [0.999, 0.5]])
    rows = rng.integers(0, ds.num_samples, b)
    x1 = ds.x[torch.from_numpy(rows)].double().numpy()
    xt = t[:, None] * x1 + (1 - t[:, None]) * rng.standard_normal(x1.shape)
    q = OracleQuery(
        x_t=torch.from_numpy(xt.astype(np.float32)),
        coeffs=get_path("linear").coefficients(t),
        t=torch.from_numpy(t),
        outputs=ALL,
        top_k=5,
    )
    if kind in ("labels", "guided"):
        q = replace(q, labels=torch.from_numpy(np.arange(b) % 5 - 1).clamp(max=3))  # -1 .. 3 (class 4 may weigh 0)
    if kind == "guided":
        q = replace(q, guidance=Guidance(scale=2.5, t_lo=0.2, t_hi=0.8))
    if kind == "exclude":
        keep = np.where(np.arange(b) % 2 == 0, ds.original_index[torch.from_numpy(rows)].numpy(), -1)
        q = replace(q, exclude=torch.from_numpy(keep))
    if kind == "fast":
        q = replace(q, precision="fast")
    return q


CASES = ["plain", "labels", "guided", "exclude", "fast"]
BOUNDS: dict = {}
BOUNDED = {
    "x1_hat_error_bound": "x1_hat",
    "velocity_error_bound": "velocity",
    "variance_error_bound": "variance",
    "entropy_error_bound": "entropy",
    "ess_error_bound": "ess",
}


def _rank(rank: int, world: int, port: int, weighted: bool, out: str) -> None:
    from floworacle_server.engine import CollectiveMerge, _passes
    from floworacle_server.service._gang import Gang, GangSpec

    try:
        torch.set_num_threads(1)
        gang = Gang(GangSpec(rank, world, rank, "127.0.0.1", port, 20.0, "gloo"), torch.device("cpu"))
        gang.join()
        full = _data(weighted)
        shard = make_shard(full, ShardSpec(rank, world))
        results: dict = {"beyond": 0}
        route = _passes._route

        def counting(batch, *a, **k):  # slots with nothing here within reach of the gang's maximum
            c = route(batch, *a, **k)
            results["beyond"] += sum(
                code == _passes.Route.SPARSE and w == 0 for code, w in zip(c.code, c.width, strict=True)
            )
            return c

        _passes._route = counting
        for kind in CASES:  # the same queries on every rank (built from the whole set)
            res = oracle(shard, _queries(full, kind), merge=CollectiveMerge(gang))
            results[kind] = {k: v.clone() for k, v in vars(res).items() if isinstance(v, torch.Tensor)}
        q = _queries(full, "labels")
        q = replace(
            q, labels=torch.full((q.x_t.shape[0],), 4)
        )  # class 4: weight 0 when weighted (one refusal, everywhere)
        try:
            oracle(shard, q, merge=CollectiveMerge(gang))
            results["refused"] = ""
        except ValueError as exc:
            results["refused"] = str(exc)
        torch.save(results, f"{out}.{rank}")
        gang.leave()
    except Exception:
        Path(f"{out}.{rank}.err").write_text(traceback.format_exc())
        raise


def _reference(ds: Dataset, q: OracleQuery) -> dict[str, np.ndarray]:
    """x1_hat, velocity, variance, entropy and ESS by the float64 formulas, query by query (numpy only)."""
    X = ds.x.double().numpy()
    orig = ds.original_index.numpy()
    lab = ds.labels.numpy() if ds.labels is not None else None
    logw = ds.log_weights.numpy() if ds.log_weights is not None else np.zeros(len(X))
    xt = q.x_t.double().numpy()
    c = q.coeffs
    out: dict[str, list] = {"x1_hat": [], "velocity": [], "variance": [], "entropy": [], "ess": []}

    def post(b: int, y: int) -> tuple[np.ndarray, float, float, float]:
        rows = np.ones(len(X), bool) if y < 0 else lab == y
        if q.exclude is not None and int(q.exclude[b]) >= 0:
            rows &= orig != int(q.exclude[b])
        logits = logw[rows] - ((xt[b] - c.alpha[b] * X[rows]) ** 2).sum(1) / (2 * c.sigma[b] ** 2)
        g = np.exp(logits - logits.max())
        g /= g.sum()
        x1 = g @ X[rows]
        nz = g[g > 0]
        return x1, float(g @ ((X[rows] - x1) ** 2).sum(1)), float(-(nz * np.log(nz)).sum()), float(1 / (g @ g))

    for b in range(len(xt)):
        y = int(q.labels[b]) if q.labels is not None else -1
        x1, var, ent, ess = post(b, y)
        if q.guidance is not None and y >= 0 and q.guidance.t_lo <= float(q.t[b]) <= q.guidance.t_hi:
            xu = post(b, -1)[0]
            x1 = xu + q.guidance.scale * (x1 - xu)
        out["x1_hat"].append(x1)
        out["velocity"].append(c.velocity_x1[b] * x1 + c.velocity_xt[b] * xt[b])
        out["variance"].append(var)
        out["entropy"].append(ent)  # a guided query's diagnostics are its conditional posterior's
        out["ess"].append(ess)
    return {k: np.asarray(v) for k, v in out.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("world, weighted", [(2, False), (3, True)])
def test_a_gang_answers_like_one_process(tmp_path: Path, world: int, weighted: bool) -> None:
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_rank, args=(world, _free_port(), weighted, out), nprocs=world, join=True, start_method="spawn")
    full = _data(weighted)
    got = [torch.load(f"{out}.{r}") for r in range(world)]
    # late in the path a query's few samples of weight lie on one shard: the others, reaching
    # from the gang's maximum, refine nothing for it (and leave only their bounded tail)
    assert all(g["beyond"] > 0 for g in got), [g["beyond"] for g in got]
    for kind in CASES:
        ref = oracle(full, _queries(full, kind))
        for name, value in vars(ref).items():
            if not isinstance(value, torch.Tensor):
                continue
            for r in range(world):  # every rank holds the whole answer
                mine = got[r][kind][name]
                if name == "topk_indices":
                    # the entries that carry weight agree; below e^-37 of the top one (the reach's
                    # edge, where either side may list a sample of weight ~1e-17 or leave -1) need not
                    weighty = ref.topk_weights > 1e-15
                    assert torch.equal(mine[weighty], value[weighty]), (kind, r)
                    continue
                if name == "topk_weights" and kind != "fast":
                    err = float((mine - value).abs().max())  # weights lie in [0, 1]
                    assert err < 1e-12, (kind, r, err)
                    continue
                if name.endswith("_error_bound"):  # a bound of the answer against the exact one
                    BOUNDS.setdefault(kind, {})[name] = mine
                    continue
                scale = float(value.abs().max()) or 1.0
                err = float((mine - value).abs().max()) / scale
                if kind == "fast":  # float32 sums in another order: held to the mode's own bound below
                    continue
                assert err < 1e-12, (kind, name, r, err)
    # every bound the gang reports holds against the float64 reference (it may be looser than a
    # single process's: a shard can route a slot dense where the whole set needed a few pairs)
    for kind, bounds in BOUNDS.items():
        exact = _reference(full, _queries(full, kind))
        for name, bound in bounds.items():
            got_out = got[0][kind][BOUNDED[name]].reshape(bound.shape[0], -1).double().numpy()
            want = exact[BOUNDED[name]].reshape(bound.shape[0], -1)
            actual = np.abs(got_out - want).max(axis=1)
            assert (actual <= bound.numpy() * (1 + 1e-9) + 1e-300).all(), (kind, name, actual.max(), bound.max())
    if weighted:
        single = ""
        q = _queries(full, "labels")
        q = replace(q, labels=torch.full((q.x_t.shape[0],), 4))
        with pytest.raises(ValueError) as info:
            oracle(full, q)
        single = str(info.value)
        assert all(g["refused"] == single for g in got), [g["refused"] for g in got]
