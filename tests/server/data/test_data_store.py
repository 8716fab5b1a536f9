"""DatasetStore: names, default, lookup errors."""

from __future__ import annotations

import numpy as np
import pytest

from floworacle_server.data import Dataset, DatasetStore


def _ds(name: str) -> Dataset:
    return Dataset.from_arrays(name, np.arange(6, dtype=np.float32).reshape(3, 2))


def test_store_default_names_iteration() -> None:
    store = DatasetStore()
    assert store.default_name is None and len(store) == 0
    with pytest.raises(KeyError, match="no data set is loaded"):
        store.get()
    a, b, c = _ds("a"), _ds("b"), _ds("c")
    store.add(a)
    store.add(b)
    assert store.default_name == "a" and store.get("") is a and store.get(None) is a
    store.add(c, default=True)
    assert store.get() is c and store.get("b") is b
    store.set_default("b")
    assert store.default_name == "b"
    assert store.names() == ["a", "b", "c"] and [d.name for d in store] == ["a", "b", "c"]
    assert "a" in store and "z" not in store
    with pytest.raises(KeyError, match="unknown data set 'z'; available: a, b, c"):
        store.get("z")
    with pytest.raises(KeyError, match="available"):
        store.set_default("z")
    with pytest.raises(ValueError, match="already loaded"):
        store.add(_ds("a"))


def test_store_constructor_default() -> None:
    store = DatasetStore([_ds("x"), _ds("y")], default="y")
    assert store.get().name == "y"
