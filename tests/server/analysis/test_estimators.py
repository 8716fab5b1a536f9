"""The cheaper targets of ``analyze estimators`` against float64 references written here: the
self-normalised mean, STF's exact unbiasedness and the minibatch bias by enumerating every
reference batch, the reference-batch and posterior draws, and the study's figures (the
conditional target's variance in closed form, a kNN estimate with k = N exact, the minibatch bias
falling with n), the CLI in-process and through a server."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle_server.analysis import (
    EstimatorSpec,
    estimator_study,
    fresh_rows,
    plot_estimators,
    posterior_draws,
    self_normalised_mean,
    stf_rows,
)
from floworacle_server.cli import main
from floworacle_server.data import Dataset


def _softmax_mean(x: np.ndarray, xt: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """sum_j softmax(-||x_t - alpha x_j||^2 / (2 sigma^2)) x_j over the rows of x, one query, float64."""
    logit = np.array([-np.sum((xt - alpha * r) ** 2) / (2 * sigma**2) for r in x])
    w = np.exp(logit - logit.max())
    return (w / w.sum()) @ x


def _data(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((4, d))
    return (centres[rng.integers(0, 4, n)] + 0.6 * rng.standard_normal((n, d))).astype(np.float32)


def test_self_normalised_mean_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((5, 7, 3))
    xt = rng.standard_normal((5, 3))
    a, s = rng.uniform(0.1, 0.9, 5), rng.uniform(0.1, 0.9, 5)
    got = self_normalised_mean(torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s), torch.from_numpy(refs))
    for q in range(5):
        np.testing.assert_allclose(got[q].numpy(), _softmax_mean(refs[q], xt[q], a[q], s[q]), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_stf_is_unbiased_and_the_fresh_minibatch_bias_falls_with_n(t: float) -> None:
    """Every batch enumerated: STF (own x1 from the posterior + n - 1 distinct others) averages to
    the exact posterior mean for every n; n fresh samples are biased, less so as n grows, exact at
    n = N. (For one query the fall need not be monotone: at t = 0.9 the posterior sits on one sample
    and the bias of n = 5 exceeds that of n = 4 here, the other samples' pulls partly cancelling.)"""
    x = _data(7, 2, 1).astype(np.float64)
    n_data = len(x)
    xt = t * x[2] + (1 - t) * np.array([0.4, -0.8])
    logit = np.array([-np.sum((xt - t * r) ** 2) / (2 * (1 - t) ** 2) for r in x])
    gamma = np.exp(logit - logit.max())
    gamma /= gamma.sum()
    exact = gamma @ x
    fresh_bias = []
    for n in range(1, n_data + 1):
        stf = np.zeros(2)
        for own in range(n_data):
            others = [i for i in range(n_data) if i != own]
            subsets = list(itertools.combinations(others, n - 1))
            for sub in subsets:
                stf += gamma[own] / len(subsets) * _softmax_mean(x[[own, *sub]], xt, t, 1 - t)
        np.testing.assert_allclose(stf, exact, rtol=0, atol=1e-12)
        subsets = list(itertools.combinations(range(n_data), n))
        fresh = sum(_softmax_mean(x[list(sub)], xt, t, 1 - t) for sub in subsets) / len(subsets)
        fresh_bias.append(float(np.sum((fresh - exact) ** 2)))
    assert fresh_bias[-1] < 1e-24 and fresh_bias[0] > 1e-2
    assert all(b < fresh_bias[0] / 20 for b in fresh_bias[2:])
    if t < 0.9:
        assert all(b1 > b2 for b1, b2 in itertools.pairwise(fresh_bias))


def test_reference_rows_are_distinct_and_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    own = torch.randint(0, 20, (4000,), generator=g)
    rows = stf_rows(own, 5, 20, g)
    assert (rows[:, 0] == own).all()
    s, _ = rows.sort(dim=1)
    assert (s[:, 1:] != s[:, :-1]).all() and int(rows.min()) >= 0 and int(rows.max()) < 20
    # others: uniform over the 19 rows that are not the own one
    counts = np.zeros(20)
    for q in range(4000):
        counts[rows[q, 1:].numpy()] += 1
    expect = 4000 * 4 / 20
    assert np.abs(counts - expect).max() < 5 * math.sqrt(expect)
    for size in (50, 100_000):
        f = fresh_rows(3000, 6, size, g)
        s, _ = f.sort(dim=1)
        assert (s[:, 1:] != s[:, :-1]).all() and int(f.max()) < size
    c = np.bincount(fresh_rows(3000, 6, 50, g).flatten().numpy(), minlength=50)
    assert np.abs(c - 360).max() < 5 * math.sqrt(360)
    with pytest.raises(ValueError, match="n <= N"):
        fresh_rows(2, 60, 50, g)


def test_posterior_draws_follow_the_exact_weights() -> None:
    x = _data(30, 3, 2)
    ds = Dataset.from_arrays("d", x)
    t = 0.55
    rng = np.random.default_rng(3)
    xt = t * x[[4, 11]].astype(np.float64) + (1 - t) * rng.standard_normal((2, 3))
    draws = posterior_draws(ds, torch.from_numpy(xt), torch.full((2,), t, dtype=torch.float64),
                            torch.full((2,), 1 - t, dtype=torch.float64), 20000, torch.Generator().manual_seed(1),
                            chunk_rows=7)  # fmt: skip
    for q in range(2):
        logit = np.array([-np.sum((xt[q] - t * r.astype(np.float64)) ** 2) / (2 * (1 - t) ** 2) for r in x])
        w = np.exp(logit - logit.max())
        w /= w.sum()
        freq = np.bincount(draws[q].numpy(), minlength=30) / 20000
        assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / 20000) + 1e-12)


def test_study_figures_on_small_data(tmp_path: Path) -> None:
    ds = Dataset.from_arrays("small", _data(160, 6, 4))
    specs = [
        EstimatorSpec("conditional"),
        EstimatorSpec("stf", n=16),
        EstimatorSpec("minibatch", n=8),
        EstimatorSpec("minibatch", n=40),
        EstimatorSpec("minibatch", n=160),
        EstimatorSpec("knn", k=160, tail=0),
        EstimatorSpec("knn", k=8, tail=32),
    ]
    t = np.array([0.25, 0.5, 0.8])
    rep = estimator_study(ds, t, specs=specs, queries_per_t=48, replicates=8, seed=2)
    c = {cv.spec.name: cv for cv in rep.curves}
    # conditional: variance A^2 sum_i gamma_i ||x_i - x1_hat||^2 / D in closed form; no bias beyond noise
    np.testing.assert_allclose(c["conditional"].variance, rep.posterior_variance, rtol=0.25)
    assert np.all(np.abs(c["conditional"].bias2) < 4 * c["conditional"].bias2_se + 1e-12)
    assert np.all(np.abs(c["stf n=16"].bias2) < 4 * c["stf n=16"].bias2_se + 1e-12)
    # a fresh batch as large as the data set is the exact target; smaller ones are biased, less as n grows
    assert np.all(np.abs(c["minibatch n=160"].bias2) < 1e-20) and np.all(c["minibatch n=160"].variance < 1e-20)
    b8, b40 = c["minibatch n=8"], c["minibatch n=40"]
    assert np.all(b8.bias2[1:] > 2 * b40.bias2[1:]) and np.all(b40.bias2[1:] > 3 * b40.bias2_se[1:])
    # kNN with k = N: the exact posterior
    assert np.all(np.abs(c["knn k=160 m=0"].bias2) < 1e-20) and np.all(c["knn k=160 m=0"].variance < 1e-20)
    assert c["knn k=8 m=32"].neighbour_share is not None
    # costs: rows read per query / N
    assert c["conditional"].cost == 0 and c["minibatch n=40"].cost == pytest.approx(0.25)
    assert c["knn k=8 m=32"].cost == pytest.approx(1 + 40 / 160)
    out = rep.to_json()
    json.dumps(out, allow_nan=False)
    assert [e["name"] for e in out["estimators"]] == [s.name for s in specs]
    assert "squared bias / S(t)" in rep.summary() and "knn k=8 m=32" in rep.summary()
    plot_estimators(rep, tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_rejects_what_it_cannot_measure() -> None:
    ds = Dataset.from_arrays("small", _data(20, 3, 5))
    with pytest.raises(ValueError, match="larger than the data set"):
        estimator_study(ds, [0.5], specs=[EstimatorSpec("minibatch", n=21)], queries_per_t=2, replicates=2)
    with pytest.raises(ValueError, match="replicates"):
        estimator_study(ds, [0.5], specs=[EstimatorSpec("conditional")], queries_per_t=2, replicates=1)
    with pytest.raises(ValueError, match="no faiss index"):
        estimator_study(ds, [0.5], specs=[EstimatorSpec("knn", k=2, tail=2)], search="index", replicates=2)
    with pytest.raises(ValueError, match="weights"):
        weighted = Dataset.from_arrays("w", _data(20, 3, 5), weights=np.arange(1, 21))
        estimator_study(weighted, [0.5], specs=[EstimatorSpec("conditional")], replicates=2)
    with pytest.raises(ValueError, match="kind"):
        EstimatorSpec("stff", n=3)


def test_cli_in_process_and_through_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from floworacle_server.service.testing import serve_in_thread
    from floworacle_server.settings import Settings

    common = ["analyze", "estimators", "--dataset", "digits", "--t-grid", "0.3,0.8", "--queries-per-t", "8",
              "--replicates", "3", "--batch-sizes", "16", "--knn", "8", "--knn-tail", "8", "--no-progress"]  # fmt: skip
    local, remote, png = tmp_path / "l.json", tmp_path / "r.json", tmp_path / "e.png"
    assert main([*common, "--json", str(local), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "variance / S(t)" in text and "stf n=16" in text and "knn k=8 m=8" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv:
        assert main([*common, "--address", srv.address, "--json", str(remote)]) == 0
    a, b = json.loads(local.read_text()), json.loads(remote.read_text())
    assert a["source"] == "in-process" and b["source"] == "server"
    for ea, eb in zip(a["estimators"], b["estimators"], strict=True):  # same draws, the same exact answers
        assert ea["name"] == eb["name"]
        np.testing.assert_allclose(eb["variance"], ea["variance"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(eb["bias2"], ea["bias2"], rtol=1e-6, atol=1e-10)
    assert main([*common[:3], "digits", "--t-grid", "0,0.5"]) == 2
    assert "start above 0" in capsys.readouterr().err
