"""Feature spaces: validation, storage (cosine rows normalised), fingerprints, index directories with
features, and tampering refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from floworacle_server.cli import main
from floworacle_server.data import Dataset, attach_features, build_index, load_dataset, load_index, read_manifest
from floworacle_server.data._features import combined_fingerprint, fingerprint_features


@pytest.fixture
def src(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3, 2)).astype(np.float32)
    y = rng.integers(0, 3, 60)  # rows get re-sorted by label: features must follow
    f = rng.standard_normal((60, 5)) * rng.uniform(0.5, 20.0, (60, 1))
    return x, y, f


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_features_follow_the_row_order_and_cosine_rows_are_unit(src, metric: str) -> None:
    x, y, f = src
    ds = Dataset.from_arrays("s", x, y)
    data_fp = ds.fingerprint
    space = attach_features(ds, f, metric)
    stored = f / np.linalg.norm(f, axis=1, keepdims=True) if metric == "cosine" else f
    stored = stored.astype(np.float32)
    # row r of the data set is the caller's sample original_index[r]: so is row r of the features
    np.testing.assert_array_equal(space.x.numpy(), stored[ds.original_index.numpy()])
    np.testing.assert_allclose(
        space.sq_norms.numpy(), (stored[ds.original_index.numpy()].astype(np.float64) ** 2).sum(1)
    )
    if metric == "cosine":
        assert np.abs(np.sqrt(space.sq_norms.numpy()) - 1.0).max() < 1e-6
    assert space.fingerprint == fingerprint_features(stored, metric) and space.data_fingerprint == data_fp
    assert ds.fingerprint == combined_fingerprint(data_fp, space.fingerprint) != data_fp
    assert (ds.feature_dim, ds.feature_metric) == (5, metric)
    assert ds.resident_bytes == Dataset.from_arrays("s", x, y).resident_bytes + 60 * 5 * 4 + 60 * 8
    with pytest.raises(ValueError, match="already has features"):
        attach_features(ds, f, metric)


def test_feature_fingerprint_is_sensitive(src) -> None:
    _, _, f = src
    f32 = f.astype(np.float32)
    base = fingerprint_features(f32, "l2")
    g = f32.copy()
    g[7, 2] = np.nextafter(g[7, 2], np.float32(np.inf))
    assert fingerprint_features(g, "l2") != base
    assert fingerprint_features(f32, "cosine") != base  # the metric is part of it
    assert combined_fingerprint("sha256:a", base) != combined_fingerprint("sha256:b", base)


@pytest.mark.parametrize(
    ("bad", "metric", "message"),
    [
        (lambda f: f[:-1], "l2", "59 rows but the data set has 60"),
        (lambda f: f[:, 0], "l2", r"shape \(N, F\)"),
        (lambda f: np.where(np.arange(60)[:, None] == 9, np.nan, f), "l2", "row 9 has a NaN"),
        (lambda f: np.where(np.arange(60)[:, None] == 4, 0.0, f), "cosine", "row 4 is zero"),
        (lambda f: f * 1e39, "l2", "overflows float32"),
        (lambda f: f.astype(np.complex64), "l2", "real numbers"),
    ],
)
def test_bad_features_are_refused(src, bad, metric: str, message: str) -> None:
    x, y, f = src
    with pytest.raises(ValueError, match=message):
        attach_features(Dataset.from_arrays("s", x, y), bad(f), metric)
    with pytest.raises(ValueError, match="feature metric"):
        attach_features(Dataset.from_arrays("s", x, y), f, "dot")


def test_index_with_features_round_trips(tmp_path: Path, src) -> None:
    x, y, f = src
    np.save(tmp_path / "f.npy", f)
    manifest = build_index(x, tmp_path / "idx", labels=y, features=tmp_path / "f.npy", features_metric="cosine",
                           progress=False)  # fmt: skip
    plain = Dataset.from_arrays("s", x, y)
    assert manifest["data_fingerprint"] == plain.fingerprint
    feats = manifest["features"]
    assert (feats["dim"], feats["metric"], feats["file"]) == (5, "cosine", "features.npy")
    assert manifest["fingerprint"] == combined_fingerprint(plain.fingerprint, feats["fingerprint"])
    ds = load_index(tmp_path / "idx")
    ref = Dataset.from_arrays("s", x, y)
    attach_features(ref, f, "cosine")
    assert ds.fingerprint == ref.fingerprint == manifest["fingerprint"]
    np.testing.assert_array_equal(ds.features.x.numpy(), ref.features.x.numpy())  # type: ignore[union-attr]
    # a file (not an index) takes its features at load time
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    from_file = load_dataset(tmp_path / "x.npy", labels=tmp_path / "y.npy", features=f, features_metric="cosine")
    assert from_file.fingerprint == ds.fingerprint
    with pytest.raises(ValueError, match="fixed at build time"):
        load_dataset(tmp_path / "idx", features=f)


def test_tampered_features_refuse_to_load(tmp_path: Path, src) -> None:
    x, y, f = src
    build_index(x, tmp_path / "idx", labels=y, features=f, progress=False)
    feats = np.load(tmp_path / "idx" / "features.npy")
    feats[3, 1] += 1.0
    np.save(tmp_path / "idx" / "features.npy", feats)
    with pytest.raises(ValueError, match="features do not match their fingerprint"):
        load_index(tmp_path / "idx")
    load_index(tmp_path / "idx", verify=False)  # trusting the files is the caller's explicit choice
    np.save(tmp_path / "idx" / "features.npy", feats[:, :4])
    with pytest.raises(ValueError, match="features file holds"):
        load_index(tmp_path / "idx", verify=False)
    with pytest.raises(ValueError, match="59 rows"):
        build_index(x, tmp_path / "other", labels=y, features=f[:59], progress=False)


def test_cli_build_with_features(tmp_path: Path, src, capsys) -> None:
    x, y, f = src
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", f)
    rc = main(["index", "build", str(tmp_path / "x.npy"), str(tmp_path / "idx"), "--features", str(tmp_path / "f.npy"),
               "--features-metric", "cosine", "--no-progress"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "5 cosine features" in out[0] and out[-1] == read_manifest(tmp_path / "idx")["fingerprint"]
    assert main(["index", "build", str(tmp_path / "x.npy"), str(tmp_path / "i2"), "--features-index", "ivf"]) == 2
    assert "--features-index needs --features" in capsys.readouterr().err
    assert not (tmp_path / "i2").exists()  # refused before anything was written
