"""The feature-space memorisation test (top-1 similarity, percentiles, share above a threshold, a
train-to-train leave-one-out baseline) against a numpy float64 brute force, and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from floworacle_server.analysis._memorization import feature_memorization_report
from floworacle_server.cli import main
from floworacle_server.data import Dataset, attach_features, build_index


def _unit32(f: np.ndarray) -> np.ndarray:
    """What the data set stores for cosine: float64-normalised rows rounded to float32 (as float64)."""
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)


def _top2_cos(stored: np.ndarray, q: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    cos = (q @ stored.T) / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(stored, axis=1)[None])
    if exclude is not None:
        cos[np.arange(q.shape[0]), exclude] = -np.inf
    idx = np.stack([np.lexsort((np.arange(stored.shape[0]), -c))[:2] for c in cos])
    return idx, np.take_along_axis(cos, idx, 1)


@pytest.fixture(scope="module")
def train() -> tuple[Dataset, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 400)  # rows are re-sorted by label internally
    f = rng.standard_normal((400, 16)) + 0.8  # features with a common direction: baseline similarities ~0.5-0.8
    ds = Dataset.from_arrays("train", x, labels)
    attach_features(ds, f, "cosine")
    return ds, x, f


def test_cosine_report_matches_numpy(train) -> None:
    ds, _, f = train
    rng = np.random.default_rng(1)
    copies = f[[3, 50, 399]] * 2.0 + 0.01 * rng.standard_normal((3, 16))  # near-copies (scale does not matter)
    fresh = rng.standard_normal((37, 16)) - 0.8  # pointing elsewhere
    gen = np.concatenate([copies, fresh])
    rep = feature_memorization_report(ds, gen, baseline_samples=150, seed=4)
    stored = _unit32(f)
    idx, cos = _top2_cos(stored, gen)
    np.testing.assert_array_equal(rep.nearest, idx)
    np.testing.assert_allclose(rep.score, cos[:, 0], atol=1e-13)
    np.testing.assert_array_equal(rep.nearest[:3, 0], [3, 50, 399])
    np.testing.assert_array_equal(rep.flagged, cos[:, 0] > 0.5)
    assert rep.flagged[:3].all() and not rep.flagged[3:].all()
    # the baseline: 150 distinct training samples, each against the others
    b = rep.baseline_index
    assert b.size == 150 and np.unique(b).size == 150
    bidx, bcos = _top2_cos(stored, stored[b], exclude=b)
    np.testing.assert_array_equal(rep.baseline_nearest, bidx[:, 0])
    np.testing.assert_allclose(rep.baseline_score, bcos[:, 0], atol=1e-13)
    assert (rep.baseline_nearest != b).all()
    js = rep.to_json()
    for key, score, flags in (
        ("generated", cos[:, 0], cos[:, 0] > 0.5),
        ("train_baseline", bcos[:, 0], bcos[:, 0] > 0.5),
    ):
        s = js[key]
        assert s["count"] == score.size and s["mean"] == pytest.approx(score.mean(), abs=1e-12)
        for q in (50, 75, 90, 95):
            assert s[f"p{q}"] == pytest.approx(np.percentile(score, q), abs=1e-12)
        assert s["share"] == pytest.approx(flags.mean())
    assert js["metric"] == "cosine" and js["score"] == "top1_similarity" and not js["approximate"]
    strict = feature_memorization_report(ds, gen, threshold=0.999, baseline_samples=150, seed=4)
    np.testing.assert_array_equal(strict.flagged, cos[:, 0] > 0.999)


def test_l2_features_use_the_ratio_test() -> None:
    rng = np.random.default_rng(2)
    f = rng.standard_normal((200, 6))
    ds = Dataset.from_arrays("t", rng.standard_normal((200, 3)).astype(np.float32))
    attach_features(ds, f, "l2")
    gen = np.concatenate([f[:4] + 1e-3, rng.standard_normal((6, 6))])
    rep = feature_memorization_report(ds, gen, baseline_samples=500)  # more than N: all N
    f32 = f.astype(np.float32).astype(np.float64)
    d = np.sqrt(((gen[:, None] - f32[None]) ** 2).sum(-1))
    d.sort(axis=1)
    np.testing.assert_allclose(rep.score, d[:, 0], rtol=1e-12)
    np.testing.assert_allclose(rep.ratio, d[:, 0] / d[:, 1], rtol=1e-12)
    np.testing.assert_array_equal(rep.flagged, d[:, 0] / d[:, 1] < 1 / 3)
    assert rep.flagged[:4].all() and rep.baseline_index.size == 200 and rep.threshold == pytest.approx(1 / 3)


def test_errors(train) -> None:
    ds, x, _ = train
    with pytest.raises(ValueError, match=r"shape \(B, 16\)"):
        feature_memorization_report(ds, np.zeros((2, 15)))
    with pytest.raises(ValueError, match="threshold"):
        feature_memorization_report(ds, np.ones((2, 16)), threshold=1.5)
    with pytest.raises(ValueError, match="no feature space"):
        feature_memorization_report(Dataset.from_arrays("p", x), np.ones((2, 16)))


def test_cli_features_beside_the_pixel_test(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 4, 4)).astype(np.float32)
    f = rng.standard_normal((300, 8)) + 1.0
    build_index(x, tmp_path / "idx", features=f, features_metric="cosine", progress=False)
    gen_x = np.concatenate([x[:5], rng.standard_normal((15, 4, 4))]).astype(np.float32)
    gen_f = np.concatenate([f[:5], rng.standard_normal((15, 8)) - 1.0])
    np.save(tmp_path / "gx.npy", gen_x)
    np.save(tmp_path / "gf.npy", gen_f)
    out, png = tmp_path / "m.json", tmp_path / "f.png"
    rc = main(["analyze", "memorization", "--samples", str(tmp_path / "gx.npy"), "--features", str(tmp_path / "gf.npy"),
               "--data", str(tmp_path / "idx"), "--json", str(out), "--features-plot", str(png),
               "--baseline-samples", "100"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "5 copies" in printed and "train-to-train" in printed and "p95" in printed
    js = json.loads(out.read_text())
    assert js["num_copies"] == 5 and js["features"]["generated"]["count"] == 20
    assert js["features"]["train_baseline"]["count"] == 100
    _, cos = _top2_cos(_unit32(f), gen_f)
    assert js["features"]["generated"]["share"] == pytest.approx((cos[:, 0] > 0.5).mean())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # features only, on a data file with --train-features
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "tf.npy", f)
    rc = main(["analyze", "memorization", "--features", str(tmp_path / "gf.npy"), "--data", str(tmp_path / "x.npy"),
               "--train-features", str(tmp_path / "tf.npy"), "--json", str(out)])  # fmt: skip
    assert rc == 0 and "samples" not in json.loads(out.read_text())
    capsys.readouterr()
    for argv, msg in [
        (["--data", str(tmp_path / "x.npy")], "give --samples"),
        (["--features", str(tmp_path / "gf.npy"), "--data", str(tmp_path / "x.npy")], "no feature space"),
        (
            [
                "--samples",
                str(tmp_path / "gx.npy"),
                "--features",
                str(tmp_path / "gx.npy"),
                "--data",
                str(tmp_path / "idx"),
            ],
            "shape",
        ),  # fmt: skip
        (
            ["--samples", str(tmp_path / "gx.npy"), "--data", str(tmp_path / "idx"), "--features-plot", "p.png"],
            "give --features",
        ),  # fmt: skip
    ]:
        assert main(["analyze", "memorization", *argv]) == 2
        assert msg in capsys.readouterr().err
