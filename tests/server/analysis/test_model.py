"""``floworacle analyze model`` and the SDK's model study on a model trained here in about a second:
the CLI (in-process engine) and the SDK (two real servers, one per data set) give the same
figures, and those figures equal an independent float64 numpy computation (brute-force oracles
with and without the query's own sample, the model called directly, a midpoint ODE written here,
brute-force nearest samples)."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from analysis_reference import brute_knn2, brute_nearest, linear_velocity

from floworacle import OracleClient
from floworacle.study import ClientData, ModelStudy, StudyConfig
from floworacle_server.analysis import EngineData, load_model
from floworacle_server.cli import main
from floworacle_server.data import Dataset, DatasetStore, load_dataset
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

SHAPE = (3, 4)
D = 12
GRID = (0.1, 0.4, 0.7, 0.9)
M, SAMPLES, STEPS = 24, 100, 8

MODEL_SOURCE = textwrap.dedent(
    '''
    """A tiny velocity model (x_t, t) -> u for the tests; loads weights.pt beside this file when present."""
    import math
    from pathlib import Path

    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, dim: int = 12, hidden: int = 64) -> None:
            super().__init__()
            self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(3, dtype=torch.float32))
            self.net = nn.Sequential(
                nn.Linear(dim + 6, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
            )

        def forward(self, x, t):
            f = t[:, None] * self.freqs
            return self.net(torch.cat([x.reshape(x.shape[0], -1), f.sin(), f.cos()], 1)).reshape(x.shape)


    torch.manual_seed(0)
    model = Net()
    _weights = Path(__file__).with_name("weights.pt")
    if _weights.exists():
        model.load_state_dict(torch.load(_weights, weights_only=True))


    def wrong_size(x, t):
        return x[:, :1]


    NotAModel = Net
    '''
)


@dataclass
class Setup:
    dir: Path
    train: np.ndarray  # (N, D) float64 of the stored float32 values
    held: np.ndarray
    model: Any
    spec: str


def _blobs(rng: np.random.Generator, centers: np.ndarray, n: int) -> np.ndarray:
    labels = rng.integers(0, centers.shape[0], n)
    return (centers[labels] + 0.5 * rng.standard_normal((n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    d = tmp_path_factory.mktemp("model_study")
    rng = np.random.default_rng(0)
    centers = 1.5 * rng.standard_normal((4, D))
    train, held = _blobs(rng, centers, 300), _blobs(rng, centers, 80)
    np.save(d / "train.npy", train.reshape(-1, *SHAPE))
    np.save(d / "heldout.npy", held.reshape(-1, *SHAPE))
    (d / "tiny_model.py").write_text(MODEL_SOURCE)
    spec = f"{d / 'tiny_model.py'}:model"
    model = load_model(spec)
    # train for a moment with the conditional target x1 - x0 (linear path)
    x = torch.from_numpy(train).reshape(-1, *SHAPE)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x1 = x[torch.randint(0, x.shape[0], (64,), generator=g)]
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(64, generator=g) * 0.99
        xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
        loss = (model(xt, t) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), d / "weights.pt")
    return Setup(d, train.astype(np.float64), held.astype(np.float64), model, spec)


CONFIG = StudyConfig(t_grid=GRID, queries_per_t=M, num_samples=SAMPLES, steps=STEPS, seed=4)


def _cli(setup: Setup, *extra: str) -> list[str]:
    return [
        "analyze", "model", "--model", setup.spec, "--data", str(setup.dir / "train.npy"),
        "--t-grid", ",".join(str(t) for t in GRID), "--queries-per-t", str(M), "--samples", str(SAMPLES),
        "--steps", str(STEPS), "--seed", "4", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def servers(setup: Setup) -> Iterator[tuple[str, str]]:
    """Two servers, one per data set (the SDK study works across servers)."""
    tr = Dataset.from_arrays("train", setup.train.astype(np.float32).reshape(-1, *SHAPE))
    ho = Dataset.from_arrays("heldout", setup.held.astype(np.float32).reshape(-1, *SHAPE))
    s = Settings(device="cpu", metrics_port=-1)  # type: ignore[call-arg]
    with serve_in_thread(s, DatasetStore([tr])) as a, serve_in_thread(s, DatasetStore([ho])) as b:
        yield a.address, b.address


def _model_u(model: Any, x_t: np.ndarray, t: float) -> np.ndarray:
    with torch.no_grad():
        xt = torch.from_numpy(x_t).float().reshape(-1, *SHAPE)
        return model(xt, torch.full((x_t.shape[0],), t, dtype=torch.float32)).double().reshape(x_t.shape[0], D).numpy()


def _first_below(t: np.ndarray, r: np.ndarray, level: float) -> float | None:
    for j in range(t.size):
        if r[j] < level:
            return (
                float(t[0]) if j == 0 else float(t[j - 1] + (r[j - 1] - level) / (r[j - 1] - r[j]) * (t[j] - t[j - 1]))
            )
    return None


def test_cli_and_sdk_match_a_float64_reference(setup: Setup, servers: tuple[str, str], tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "model.json", tmp_path / "model.png"
    rc = main(_cli(setup, "--heldout-data", str(setup.dir / "heldout.npy"), "--json", str(out), "--plot", str(png)))
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "model switch" in printed and "copies (d1/d2 < 0.3333)" in printed
    assert png.stat().st_size > 10_000
    js = json.loads(out.read_text())
    assert js["kind"] == "model_study" and js["t"] == list(GRID) and js["queries_per_t"] == M

    with OracleClient(servers[0]) as ca, OracleClient(servers[1]) as cb:
        study = ModelStudy(
            ClientData(ca, "train", setup.train.reshape(-1, *SHAPE)),
            ClientData(cb, "heldout", setup.held.reshape(-1, *SHAPE)),
            CONFIG,
        )
        rep = study.run(setup.model, name="tiny")
        again = study.run(setup.model, name="tiny")  # the cached oracle answers give the same figures
    for s in ("train", "heldout"):
        for o, v in rep.velocity[s].items():
            np.testing.assert_array_equal(again.velocity[s][o], v)
            # CLI in-process and SDK over gRPC: the same queries, the same exact oracle
            np.testing.assert_allclose(js["distances"]["velocity"][s][o], v, rtol=1e-9)
            np.testing.assert_allclose(js["distances"]["x1"][s][o], rep.x1[s][o], rtol=1e-9)
    assert js["switch"] == pytest.approx(rep.switch)
    for k in ("copy_share", "heldout_copy_share", "nearest_train_mean", "nearest_heldout_mean",
              "heldout_nearest_train_mean", "train_nearest_heldout_mean"):  # fmt: skip
        assert js["samples"][k] == pytest.approx(rep.samples[k], rel=1e-9), k
    assert js["train"]["fingerprint"] == rep.info["train"]["fingerprint"]

    # the independent float64 reference, from the study's own draws (rows and noise)
    t = np.asarray(GRID)
    sets = {"train": setup.train, "heldout": setup.held}
    ref: dict[str, dict[str, np.ndarray]] = {s: {} for s in sets}
    for s, X in sets.items():
        rows, x0 = rep.query_rows[s], rep.query_noise[s]
        assert rows.shape == (M,) and x0.shape == (M, D)
        per: dict[str, list[np.ndarray]] = {"train": [], "heldout": [], "loo": []}
        for tj in GRID:
            x_t = tj * X[rows] + (1 - tj) * x0
            u_m = _model_u(setup.model, x_t, tj)
            oracles = {"train": linear_velocity(setup.train, x_t, tj), "heldout": linear_velocity(setup.held, x_t, tj)}
            if s == "train":
                oracles["loo"] = linear_velocity(setup.train, x_t, tj, exclude=rows)
            for o, u in oracles.items():
                per[o].append(((u_m - u) ** 2).sum(axis=1) / D)
        for o, vals in per.items():
            if vals:
                q = np.stack(vals)
                np.testing.assert_allclose(rep.per_query[s][o], q, rtol=2e-6, atol=1e-12)
                ref[s][o] = q.mean(axis=1)
                np.testing.assert_allclose(rep.velocity[s][o], ref[s][o], rtol=2e-6)
                np.testing.assert_allclose(rep.x1[s][o], ref[s][o] * (1 - t) ** 2, rtol=2e-6)
    assert set(rep.velocity["heldout"]) == {"train", "heldout"}
    # leave-one-out differs from the plain training oracle where the posterior has collapsed
    assert ref["train"]["loo"][-1] > 2 * ref["train"]["train"][-1]
    for s in sets:
        want = _first_below(t, ref[s]["train"] / ref[s]["heldout"], 0.5)
        assert (rep.switch[s] is None) == (want is None)
        if want is not None:
            assert rep.switch[s] == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(rep.fit_ratio(), ref["train"]["train"] / ref["heldout"]["heldout"], rtol=5e-6)

    # samples: a midpoint ODE written here from the study's noise, then brute-force neighbours
    assert rep.sample_noise is not None and rep.generated is not None
    x = rep.sample_noise.copy()
    grid = np.linspace(0.0, 1.0 - 1e-4, STEPS + 1)
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        h = t1 - t0
        mid = x + 0.5 * h * _model_u(setup.model, x, t0)
        x = x + h * _model_u(setup.model, mid, t0 + 0.5 * h)
    np.testing.assert_allclose(rep.generated, x, rtol=1e-5, atol=1e-5)
    _, d = brute_knn2(setup.train, rep.generated)
    ratio = d[:, 0] / d[:, 1]
    assert rep.samples["copy_share"] == pytest.approx(float((ratio < 1 / 3).mean()))
    assert rep.samples["copies"] == int((ratio < 1 / 3).sum()) and rep.samples["count"] == SAMPLES
    assert rep.samples["nearest_train_mean"] == pytest.approx(float(d[:, 0].mean()), rel=1e-9)
    assert rep.samples["nearest_heldout_mean"] == pytest.approx(brute_nearest(setup.held, x).mean(), rel=1e-5)
    h_rows, t_rows = rep.baseline_rows["heldout"], rep.baseline_rows["train"]
    assert h_rows.size == 80 and t_rows.size == SAMPLES  # all 80 held-out samples, 100 of 300 training samples
    _, dh = brute_knn2(setup.train, setup.held[h_rows])
    assert rep.samples["heldout_copy_share"] == pytest.approx(float((dh[:, 0] / dh[:, 1] < 1 / 3).mean()))
    assert rep.samples["heldout_nearest_train_mean"] == pytest.approx(float(dh[:, 0].mean()), rel=1e-9)
    want_q = brute_nearest(setup.held, setup.train[t_rows]).mean()
    assert rep.samples["train_nearest_heldout_mean"] == pytest.approx(want_q, rel=1e-9)


def test_cli_holdout_split_and_transition(setup: Setup, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    assert main(_cli(setup, "--holdout", "0.25", "--holdout-seed", "1", "--transition", "--json", str(out))) == 0
    printed = capsys.readouterr().out
    js = json.loads(out.read_text())
    assert js["train"]["name"] == "train-train" and js["train"]["N"] == 225 and js["heldout"]["N"] == 75
    assert "data set's switch (analyze transition): t_switch_50 =" in printed
    assert set(js["data_switch"]) >= {"t_switch_50", "t_switch_99"}
    # the in-process split is the study's input: the same split through EngineData gives the same figures
    from floworacle_server.data import split_dataset

    tr, ho = split_dataset(load_dataset(setup.dir / "train.npy"), 0.25, 1)
    rep = ModelStudy(EngineData(tr), EngineData(ho), CONFIG).run(setup.model)
    np.testing.assert_allclose(js["distances"]["velocity"]["train"]["loo"], rep.velocity["train"]["loo"], rtol=1e-12)


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (":nothing", "has no attribute 'nothing'"),
        (":NotAModel", "is a class; give an instance"),
        (":wrong_size", "the model returned (24, 1, 4) for x_t of shape (24, 3, 4)"),
    ],
)
def test_cli_model_errors(setup: Setup, capsys, suffix: str, message: str) -> None:
    args = _cli(setup, "--heldout-data", str(setup.dir / "heldout.npy"))
    args[args.index("--model") + 1] = str(setup.dir / "tiny_model.py") + suffix
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_input_errors(setup: Setup, tmp_path: Path, capsys) -> None:
    assert main(_cli(setup, "--heldout-data", str(tmp_path / "missing.npy"))) == 2
    assert f"--heldout-data {tmp_path / 'missing.npy'} does not exist" in capsys.readouterr().err
    args = _cli(setup, "--heldout", "digits")
    assert main(args) == 2
    assert "different sizes" in capsys.readouterr().err
    args = _cli(setup, "--holdout", "0.25")
    args[args.index("--model") + 1] = "no_such_module_here:model"
    assert main(args) == 2
    assert "importing no_such_module_here failed: ModuleNotFoundError" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses it
        main(_cli(setup, "--holdout", "0.25", "--method", "rk4"))
    assert "invalid choice: 'rk4'" in capsys.readouterr().err
    assert main(_cli(setup, "--holdout", "0.25", "--t-grid", "0.5,1.0")) == 2
    assert "must lie in [0, 0.9999" in capsys.readouterr().err


def test_load_model_from_the_working_directory(setup: Setup, monkeypatch) -> None:
    monkeypatch.chdir(setup.dir)
    monkeypatch.syspath_prepend(str(setup.dir))
    net = load_model("tiny_model:model")
    assert isinstance(net, torch.nn.Module)
    for a, b in zip(net.parameters(), setup.model.parameters(), strict=True):
        assert torch.equal(a, b)  # weights.pt loaded at import
    with pytest.raises(ValueError, match="write MODULE:CALLABLE"):
        load_model("tiny_model")


def test_readme_walkthrough_example(tmp_path: Path, monkeypatch, capsys) -> None:
    """examples/digits_model.py trains and saves the model the README's `analyze model` command studies."""
    example = Path(__file__).resolve().parents[3] / "examples" / "digits_model.py"
    weights = tmp_path / "w.pt"
    monkeypatch.setenv("FLOWORACLE_DIGITS_MODEL", str(weights))
    spec = importlib.util.spec_from_file_location("__main__digits_model", example)
    assert spec is not None and spec.loader is not None
    with pytest.raises(RuntimeError, match="train the model first"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    monkeypatch.setattr(sys, "argv", ["digits_model.py", "--steps", "30"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(example), run_name="__main__")  # trains (a few steps here) and saves
    assert done.value.code == 0
    assert weights.is_file()
    capsys.readouterr()
    rc = main(["analyze", "model", "--model", f"{example}:model", "--dataset", "digits", "--holdout", "0.2",
               "--queries-per-t", "8", "--samples", "20", "--steps", "4", "--t-grid", "0.3,0.9", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "model switch" in capsys.readouterr().out


def test_mixed_sampling_matches_a_float64_reference(setup: Setup, tmp_path: Path, capsys) -> None:
    """Oracle up to the switch, model after it: the study's samples equal a midpoint ODE written here
    (brute-force oracle, the model called directly), copies and distances a brute-force search."""
    held = Dataset.from_arrays("held", setup.held.astype(np.float32).reshape(-1, *SHAPE))
    train = Dataset.from_arrays("train", setup.train.astype(np.float32).reshape(-1, *SHAPE))
    study = ModelStudy(EngineData(train), EngineData(held), CONFIG)
    rep = study.run(setup.model)
    switches = [0.0, 0.35, 0.7, 1.0]
    mixed = study.mixed(setup.model, switches)
    assert rep.generated is not None and rep.sample_noise is not None
    np.testing.assert_array_equal(mixed.samples[0], rep.generated)  # switch 0: the model's own samples
    grid = np.linspace(0.0, 1.0 - 1e-4, STEPS + 1)
    for j, sw in enumerate(switches):
        g = grid if sw in (0.0, 1.0) else np.sort(np.append(grid, sw))
        x = rep.sample_noise.copy()
        for t0, t1 in zip(g[:-1], g[1:], strict=True):
            h = t1 - t0

            def f(z: np.ndarray, t: float, before: bool = t0 < sw) -> np.ndarray:
                return linear_velocity(setup.train, z, t) if before else _model_u(setup.model, z, t)

            x = x + h * f(x + 0.5 * h * f(x, t0), t0 + 0.5 * h)
        np.testing.assert_allclose(mixed.samples[j], x, rtol=1e-5, atol=1e-5)
        _, d = brute_knn2(setup.train, x)
        ratio = d[:, 0] / d[:, 1]
        assert mixed.copies[j] == int((ratio < 1 / 3).sum())
        assert mixed.copy_share[j] == pytest.approx(float((ratio < 1 / 3).mean()))
        assert mixed.nearest_train_mean[j] == pytest.approx(float(d[:, 0].mean()), rel=1e-5)
        assert mixed.nearest_train_median[j] == pytest.approx(float(np.median(d[:, 0])), rel=1e-5)
        assert mixed.nearest_heldout_mean[j] == pytest.approx(brute_nearest(setup.held, x).mean(), rel=1e-5)
    # the oracle's samples are copies of training samples; the switch moves the share between the two ends
    assert mixed.copy_share[-1] > 0.9 and mixed.copy_share[-1] > mixed.copy_share[0]
    assert mixed.nearest_train_mean[-1] < 0.1 * mixed.nearest_train_mean[0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        study.mixed(setup.model, [0.5, 1.2])

    out = tmp_path / "mixed.json"
    rc = main(
        _cli(setup, "--heldout-data", str(setup.dir / "heldout.npy"), "--mixed", "0,0.35,0.7,1", "--json", str(out))
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "mixed sampling: the training-set oracle up to the switch time" in printed
    js = json.loads(out.read_text())["mixed"]
    assert js["switches"] == switches and js["count"] == SAMPLES
    np.testing.assert_allclose(js["copy_share"], mixed.copy_share)
    np.testing.assert_allclose(js["nearest_train_mean"], mixed.nearest_train_mean, rtol=1e-9)
    assert main(_cli(setup, "--heldout-data", str(setup.dir / "heldout.npy"), "--mixed", "0,2")) == 2
    assert "switch times lie in [0, 1]" in capsys.readouterr().err
