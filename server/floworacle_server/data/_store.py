"""The set of data sets one server holds, by name, with a default for requests that name none."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from floworacle.protocol import rules
from floworacle_server.data._dataset import Dataset

__all__ = ["DatasetStore"]


class DatasetStore:
    """A registry of named :class:`Dataset` objects.

    The default is the first data set added unless one is set with :meth:`set_default`.
    ``get("")`` (or ``get(None)``) returns the default. Iteration yields data sets in the order
    they were added. Adding and reading are safe from several threads.
    """

    def __init__(self, datasets: list[Dataset] | None = None, *, default: str | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Dataset] = {}
        self._default: str | None = None
        for ds in datasets or []:
            self.add(ds)
        if default is not None:
            self.set_default(default)

    def add(self, dataset: Dataset, *, default: bool = False) -> None:
        """Register ``dataset`` under its name; ValueError if the name is empty or taken."""
        if not dataset.name:
            raise ValueError("a data set needs a non-empty name")
        with self._lock:
            if dataset.name in self._items:
                raise ValueError(f"a data set named {dataset.name!r} is already loaded; give the new one another name")
            self._items[dataset.name] = dataset
            if default or self._default is None:
                self._default = dataset.name

    def set_default(self, name: str) -> None:
        """Make ``name`` the data set used when a request names none."""
        with self._lock:
            if name not in self._items:
                raise KeyError(self._unknown(name))
            self._default = name

    def get(self, name: str | None = "") -> Dataset:
        """The data set ``name``, or the default for ``""``/None; KeyError listing the names otherwise."""
        with self._lock:
            key = name or self._default
            if key is None:
                raise KeyError("no data set is loaded; start the server with a data set")
            if key not in self._items:
                raise KeyError(self._unknown(key))
            return self._items[key]

    def _unknown(self, name: str) -> str:
        return f"unknown data set {rules.echo(name)}; available: {', '.join(self._items) or '(none)'}"

    def names(self) -> list[str]:
        """Names in the order they were added."""
        with self._lock:
            return list(self._items)

    @property
    def default_name(self) -> str | None:
        """Name of the default data set, or None when the store is empty."""
        return self._default

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Dataset]:
        with self._lock:
            items = list(self._items.values())
        return iter(items)
