"""The embedded digits set: shape, range, labels, and equality with scikit-learn's copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle_server.data import load_dataset, load_digits
from floworacle_server.data._digits import digits_arrays


def test_digits_shape_range_labels() -> None:
    ds = load_digits()
    assert ds.name == "digits"
    assert (ds.num_samples, ds.dim, ds.sample_shape) == (1797, 64, (64,))
    assert ds.x.dtype == torch.float32
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    # values are x / 8 - 1 for integer pixel counts 0..16
    np.testing.assert_array_equal(((ds.x + 1) * 8).round(), (ds.x + 1) * 8)
    assert ds.num_classes == 10
    assert ds.labels is not None
    assert torch.equal(torch.bincount(ds.labels), ds.class_offsets.diff())  # type: ignore[union-attr]
    assert torch.equal(ds.sq_norms, ds.x.double().pow(2).sum(1))


def test_load_dataset_digits_name_and_dtype() -> None:
    ds = load_dataset("digits", dtype="float16", name="d16")
    assert ds.name == "d16" and ds.x.dtype == torch.float16


def test_embedded_file_matches_sklearn() -> None:
    datasets = pytest.importorskip("sklearn.datasets", reason="sklearn is a dev dependency for this cross-check")
    ref = datasets.load_digits()
    x, y = digits_arrays()
    np.testing.assert_array_equal(x.astype(np.float64), ref.data / 8.0 - 1.0)
    np.testing.assert_array_equal(y, ref.target)
