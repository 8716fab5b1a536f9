"""Image shapes of data sets: declared where a data set is made (digits, index manifests, the
image_shape setting, 3-D samples), kept through splits and shards, refused when inconsistent,
and never changing the sample shape clients see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from floworacle_server.cli import main
from floworacle_server.data import (
    Dataset,
    build_index,
    load_dataset,
    load_digits,
    load_index,
    parse_image_shape,
    read_manifest,
    split_dataset,
)
from floworacle_server.data._shard import ShardSpec, make_shard
from floworacle_server.service._server import build_store
from floworacle_server.settings import Settings, load_settings


def test_digits_are_8x8_images_served_flat() -> None:
    ds = load_digits()
    assert ds.sample_shape == (64,) and ds.image_shape == (1, 8, 8)
    tr, ho = split_dataset(ds, 0.2, 0)
    assert tr.image_shape == ho.image_shape == (1, 8, 8)
    assert make_shard(ds, ShardSpec(0, 2)).image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="digits are \\(1, 8, 8\\) images"):
        load_dataset("digits", image_shape="1,4,16")
    assert load_dataset("digits", image_shape="1,8,8").image_shape == (1, 8, 8)


def test_default_and_declared_shapes() -> None:
    x = np.zeros((5, 3, 4, 2), dtype=np.float32)
    assert Dataset.from_arrays("a", x).image_shape == (3, 4, 2)  # 3-D samples are their own image shape
    assert Dataset.from_arrays("b", x.reshape(5, -1)).image_shape is None
    flat = Dataset.from_arrays("c", x.reshape(5, -1), image_shape="2,3,4")
    assert flat.image_shape == (2, 3, 4) and flat.sample_shape == (24,)
    with pytest.raises(ValueError, match="C \\* H \\* W = 24"):
        Dataset.from_arrays("d", x.reshape(5, -1), image_shape=(1, 5, 5))
    assert parse_image_shape("1x8x8") == (1, 8, 8)
    with pytest.raises(ValueError, match="three positive integers"):
        parse_image_shape("8,8")


def test_index_manifest_carries_it_and_the_setting_fills_it_in(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((12, 48)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["index", "build", str(tmp_path / "x.npy"), str(tmp_path / "i"), "--image-shape", "3,4,4",
                 "--no-progress"]) == 0  # fmt: skip
    assert read_manifest(tmp_path / "i")["image_shape"] == [3, 4, 4]
    ds = load_index(tmp_path / "i")
    assert ds.image_shape == (3, 4, 4) and ds.sample_shape == (48,)
    with pytest.raises(ValueError, match="declares image shape"):
        load_index(tmp_path / "i", image_shape="1,6,8")
    build_index(x, tmp_path / "j", progress=False)
    assert load_index(tmp_path / "j").image_shape is None
    assert load_index(tmp_path / "j", image_shape="1,6,8").image_shape == (1, 6, 8)
    # served: the setting names the data set, or stands alone beside a single one
    s = Settings(data=[f"a={tmp_path / 'x.npy'}", f"b={tmp_path / 'j'}"], image_shape=["a=3,4,4", "b=3,16,1"])
    store = build_store(s)
    assert store.get("a").image_shape == (3, 4, 4) and store.get("b").image_shape == (3, 16, 1)
    one = build_store(Settings(data=[str(tmp_path / "x.npy")], image_shape=["1,6,8"]))
    assert one.get("x").image_shape == (1, 6, 8)


def test_setting_validation_and_environment() -> None:
    with pytest.raises(ValueError, match="exactly one data set"):
        Settings(data=["a=x.npy", "b=y.npy"], image_shape=["1,8,8"])
    with pytest.raises(ValueError, match="three positive integers"):
        Settings(image_shape=["a=8,8"])
    env = {"FLOWORACLE_IMAGE_SHAPE": "a=1,8,8;b=3,4,4", "FLOWORACLE_DATA": "a=x.npy,b=y.npy"}
    s = load_settings(None, env)
    assert s.image_shape == ["a=1,8,8", "b=3,4,4"] and s.image_shape_for("b") == "3,4,4"
