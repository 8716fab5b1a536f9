"""The exact screen `auto` uses follows a calibration on this machine; the engine returns the
choice (the server records it in the data set, which reports it), and it is the one the search
then runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import floworacle_server.engine._backend as backend_mod
import floworacle_server.engine._knn as knn_mod
from floworacle_server.data import BackendChoice, Dataset
from floworacle_server.engine import calibrate_nearest_backends, nearest, nearest_info


def _data(n: int = 5000, d: int = 24, seed: int = 0) -> Dataset:
    return Dataset.from_arrays("cal", np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def test_calibration_measures_both_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    backend_mod._cache.clear()
    ds = _data()
    choices = calibrate_nearest_backends(ds)
    choice = choices["data"]
    assert choice.torch_ms is not None and choice.faiss_ms is not None
    assert choice.torch_ms > 0 and choice.faiss_ms > 0
    assert f"torch {choice.torch_ms:.1f} ms" in choice.reason and f"faiss {choice.faiss_ms:.1f} ms" in choice.reason
    assert choice.torch_over_faiss == pytest.approx(choice.torch_ms / choice.faiss_ms)
    assert choice.backend == ("faiss" if choice.faiss_ms < choice.torch_ms else "torch")
    assert f"{choice.backend} " in choice.reason.rsplit(":", 1)[1] and "best of 8" in choice.reason
    assert "5,000 rows of D = 24" in choice.reason  # N is below the calibration size: all rows
    assert ds.nearest_backends == {}  # the engine returns its choice; the data set's owner records it
    ds.nearest_backends.update(choices)
    assert calibrate_nearest_backends(ds)["data"] is choice  # a recorded choice is kept
    info = nearest_info(ds)
    assert info.backend == choice.backend and info.backend_reason == choice.reason
    assert info.exact_max_samples == ds.exact_nearest_max_samples and info.feature_dim == 0

    # a second data set of the same shape reuses the measurement (no timing runs)
    def no_measure(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(backend_mod, "_measure", no_measure)
    again = calibrate_nearest_backends(_data(seed=1))["data"]
    assert again.backend == choice.backend and again.reason.endswith("(cached for this shape)")
    # force re-measures
    with pytest.raises(AssertionError, match="measured again"):
        calibrate_nearest_backends(_data(seed=2), force=True)


@pytest.mark.parametrize("winner", ["torch", "faiss"])
def test_auto_runs_the_chosen_screen(monkeypatch: pytest.MonkeyPatch, winner: str) -> None:
    backend_mod._cache.clear()
    calls: list[str] = []
    real_torch, real_faiss = knn_mod._screen_torch, knn_mod._screen_faiss

    def spy_torch(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append("torch")
        return real_torch(*a, **kw)

    def spy_faiss(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append("faiss")
        return real_faiss(*a, **kw)

    monkeypatch.setattr(knn_mod, "_screen_torch", spy_torch)
    monkeypatch.setattr(knn_mod, "_screen_faiss", spy_faiss)
    # the calibration's timings decide; here they are given, as if measured
    fast, slow = 1.0, 2.0
    monkeypatch.setattr(
        backend_mod,
        "_measure",
        lambda sp, rows, seed: (fast, slow) if winner == "torch" else (slow, fast),
    )
    ds = _data(800, 12)
    res = nearest(ds, torch.randn(5, 12), 3)  # the first auto query calibrates
    chosen = nearest_info(ds)  # the same measurement, cached for this shape
    assert chosen.backend == winner
    assert calls and set(calls) == {winner}
    assert "2.00x faster" in chosen.backend_reason
    assert res.indices.shape == (5, 3)
    calls.clear()
    nearest(ds, torch.randn(2, 12), 3, backend="torch" if winner == "faiss" else "faiss")
    assert set(calls) == {"torch" if winner == "faiss" else "faiss"}  # an explicit backend overrides


def test_configured_and_gpu_choices() -> None:
    ds = _data(300, 4)
    c = calibrate_nearest_backends(ds, prefer="torch")["data"]
    assert (c.backend, c.reason) == ("torch", "set by configuration")
    with pytest.raises(ValueError, match="nearest backend must be"):
        calibrate_nearest_backends(ds, prefer="annoy")
    ds.nearest_backends["data"] = BackendChoice("faiss", "test")
    assert nearest_info(ds).backend == "faiss"  # a recorded choice is what DescribeDataset reports
    if torch.cuda.is_available():
        gpu = Dataset.from_arrays("g", np.zeros((10, 3), dtype=np.float32), device="cuda")
        assert calibrate_nearest_backends(gpu)["data"].backend == "torch"


def test_features_space_is_calibrated_too() -> None:
    from floworacle_server.data import attach_features

    backend_mod._cache.clear()
    ds = _data(400, 6)
    attach_features(ds, np.random.default_rng(3).standard_normal((400, 5)), "cosine")
    assert set(calibrate_nearest_backends(ds)) == {"data", "features"}
    info = nearest_info(ds)
    assert info.feature_dim == 5 and info.feature_metric == "cosine"
