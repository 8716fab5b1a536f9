"""Accuracy and returned bound of the exact oracle at float64's hardest case: queries at t = 0.999
nearly equidistant from two or three samples (and, for contrast, near one sample), against an
80-bit extended-precision reference written here (numpy long double; x86).

    python benchmarks/near_ties.py                       # D = 784 and 3,072, uniform data in [-1, 1]
    python benchmarks/near_ties.py --dims 64 --n 1797    # a digits-sized set

Near t = 1 a logit is ||x_t - alpha x_i||^2 / (2 sigma^2), millions to hundreds of millions of
nats, and float64 carries a relative 1e-16 of it: the velocity of a real tie is only as accurate
as float64 allows there (its conditioning), while a query near one sample is accurate to ~1e-16.
Prints, per kind of query, the error and the returned velocity_error_bound in units of
|A_t| max|x| (the scale of the velocity's x1_hat part, A_t = 1 / (1 - t); an error of x1_hat
of e max|x| shows as e) and their ratio.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import OracleQuery, oracle


def extended_velocity(X: np.ndarray, xt: np.ndarray, t: float) -> np.ndarray:
    """Linear-path velocity in long double: softmax of -||x_t - t x_i||^2 / (2 (1 - t)^2)."""
    ld = np.longdouble
    data, a = X.astype(ld), ld(t)
    s = ld(1) - a
    out = []
    for q in xt.astype(ld):
        logits = -((q[None, :] - a * data) ** 2).sum(axis=1) / (2 * s * s)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out.append(((w[:, None] * data).sum(axis=0) - q) / s)
    return np.array(out)


def tie_queries(rng: np.random.Generator, X: np.ndarray, t: float, kinds: list[int]) -> np.ndarray:
    """Queries at time t (linear path): k = 2, on the line through two samples at a logit gap drawn
    from [-2, 2] nats (a real tie: both weights >= 0.12); k = 3, near the midpoint of three (most
    resolve to one or two of them); k = 1, near one sample."""
    sigma = 1.0 - t
    out = []
    for k in kinds:
        rows = X[rng.choice(len(X), size=k, replace=False)].astype(np.float64)
        if k == 2:
            delta = rows[0] - rows[1]
            lam = (
                rng.uniform(-2, 2) * sigma**2 / (t**2 * float(delta @ delta))
            )  # l_a - l_b = t^2 |delta|^2 lam / sigma^2
            out.append(t * (rows.mean(axis=0) + lam * delta))
        else:
            out.append(t * rows.mean(axis=0) + sigma * 1e-3 * rng.standard_normal(X.shape[1]))
    return np.array(out)


def run(dim: int, n: int, per_kind: int, t: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, dim)).astype(np.float32)
    xq = tie_queries(rng, X, t, [2] * per_kind + [3] * per_kind + [1] * per_kind)
    c = get_path("linear").coefficients(np.full(len(xq), t))
    res = oracle(
        Dataset.from_arrays("r", X),
        OracleQuery(x_t=torch.from_numpy(xq), coeffs=c, outputs=("velocity", "topk"), top_k=2),
    )
    ref = extended_velocity(X, xq, t)
    xmax = float(np.abs(X).max())
    scale = (1.0 / (1.0 - t)) * xmax  # |A_t| max|x|: the size of the velocity's x1 part
    err = np.abs(res.velocity.numpy() - ref.astype(np.float64)).max(axis=1)
    bound = res.velocity_error_bound.numpy()
    second = res.topk_weights.numpy()[:, 1]
    assert (err <= bound).all(), "a bound does not hold"
    print(f"D = {dim}, N = {n}, t = {t}")
    for name, mask in (("tie (2nd weight > 1e-3)", second > 1e-3), ("one sample (2nd < 1e-12)", second < 1e-12)):
        if not mask.any():
            continue
        ratio = bound[mask] / np.maximum(err[mask], 1e-300)
        print(
            f"  {name:24s} {int(mask.sum()):3d} queries: error {(err[mask] / scale).min():.1e} - {(err[mask] / scale).max():.1e}"
            f" of |A_t| max|x|, bound {(bound[mask] / scale).min():.1e} - {(bound[mask] / scale).max():.1e}, "
            f"bound / error {ratio.min():.3g} - {ratio.max():.3g}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[784, 3072])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--per-kind", type=int, default=12, help="queries of each kind (2-way tie, 3-way tie, one sample)")
    ap.add_argument("--t", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        print("note: long double is float64 here; the reference is no more precise than the engine")
    for d in args.dims:
        run(d, args.n, args.per_kind, args.t, args.seed)


if __name__ == "__main__":
    main()
