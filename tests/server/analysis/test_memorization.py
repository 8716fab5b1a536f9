"""Memorisation report: planted copies are flagged, fresh samples pass; distances against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analysis_reference import brute_knn2

from floworacle_server.analysis import image_shape_for, memorization_report
from floworacle_server.analysis._memorization import training_rows
from floworacle_server.data import Dataset, load_digits


@pytest.fixture(scope="module")
def train() -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    labels = rng.integers(0, 4, size=300)  # rows get re-sorted by label: indices must map back
    return Dataset.from_arrays("train", x, labels), x


def test_planted_copies_are_flagged_and_fresh_samples_pass(train: tuple[Dataset, np.ndarray]) -> None:
    ds, x = train
    rng = np.random.default_rng(1)
    src = np.array([5, 17, 101, 250, 299, 0, 42, 77])
    exact = x[src[:4]].astype(np.float64)
    noisy = x[src[4:]] + 0.01 * rng.standard_normal((4, 32))
    fresh = rng.standard_normal((12, 32))
    samples = np.concatenate([exact, noisy, fresh])
    rep = memorization_report(ds, samples)
    ref_idx, ref_d = brute_knn2(x, samples)
    np.testing.assert_array_equal(rep.nearest, ref_idx)
    np.testing.assert_allclose(rep.d1, ref_d[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rep.d2, ref_d[:, 1], rtol=1e-12)
    np.testing.assert_array_equal(rep.nearest[:8, 0], src)
    assert (rep.d1[:4] == 0).all() and (rep.ratio[:4] == 0).all()
    np.testing.assert_array_equal(rep.copy, [True] * 8 + [False] * 12)
    assert rep.copy_fraction == pytest.approx(8 / 20)
    assert (rep.ratio[8:] > 0.5).all()  # fresh Gaussian samples in D = 32 are about equidistant
    js = rep.to_json(dataset="train")
    assert js["copy_fraction"] == pytest.approx(0.4) and js["num_copies"] == 8
    first = js["samples"][0]
    assert set(first) >= {"index", "nearest", "d1", "d2", "ratio", "copy"}
    assert first["index"] == 0 and first["nearest"] == 5 and first["copy"] is True


def test_threshold_and_duplicates(train: tuple[Dataset, np.ndarray]) -> None:
    ds, x = train
    s = x[:3].astype(np.float64) + 0.3  # moved away: ratio well above 0
    loose = memorization_report(ds, s, threshold=1.0)
    tight = memorization_report(ds, s, threshold=1e-6)
    assert loose.copy.all() and not tight.copy.any()
    # a duplicated training sample: d1 = d2 = 0, ratio defined as 0 (a copy)
    dup = np.concatenate([x[:10], x[:1]])
    ds2 = Dataset.from_arrays("dup", dup)
    rep = memorization_report(ds2, x[:1])
    assert rep.d1[0] == 0 and rep.d2[0] == 0 and rep.ratio[0] == 0 and rep.copy[0]
    with pytest.raises(ValueError, match="threshold"):
        memorization_report(ds, s, threshold=0.0)
    with pytest.raises(ValueError, match="shape"):
        memorization_report(ds, np.zeros((2, 31)))


def test_training_rows_map_original_indices(train: tuple[Dataset, np.ndarray]) -> None:
    ds, x = train
    idx = np.array([3, 299, 0, 150])
    np.testing.assert_array_equal(training_rows(ds, idx), x[idx].astype(np.float64))


def test_image_shapes() -> None:
    assert image_shape_for(load_digits()) == (8, 8)
    rgb = Dataset.from_arrays("rgb", torch.zeros(2, 3, 4, 4))
    assert image_shape_for(rgb) == (3, 4, 4)
    flat = Dataset.from_arrays("flat", np.zeros((2, 10), dtype=np.float32))
    assert image_shape_for(flat) is None
    assert image_shape_for(flat, (1, 2, 5)) == (1, 2, 5)
    with pytest.raises(ValueError):
        image_shape_for(flat, (3, 3))
