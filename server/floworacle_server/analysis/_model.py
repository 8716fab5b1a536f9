"""``floworacle analyze model`` in-process: the SDK's model study (:mod:`floworacle.study`) run
against resident data sets through the exact engine, and the loader of ``module:callable`` models.

The study itself lives in the SDK, one implementation for both sides; this module supplies the
:class:`~floworacle.study.StudyData` of a :class:`~floworacle_server.data.Dataset`
(:class:`EngineData`) and imports the user's model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path as FilePath
from typing import Any

import numpy as np
import torch

from floworacle.paths import Path
from floworacle.study import NearestAnswer
from floworacle_server.data import Dataset

__all__ = ["EngineData", "load_model"]


class EngineData:
    """A resident data set as the model study's :class:`~floworacle.study.StudyData`: the exact
    engine's oracle of every kind (``exclude`` for the leave-one-out queries) and nearest samples."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def fingerprint(self) -> str:
        return self.dataset.fingerprint

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.sample_shape)

    def samples(self, indices: np.ndarray) -> np.ndarray:
        ds = self.dataset
        rows = ds.rows_of(torch.from_numpy(np.asarray(indices, dtype=np.int64)))
        return ds.x[rows].to(torch.float64).cpu().numpy()

    def velocity(
        self,
        x_t: np.ndarray,
        t: np.ndarray,
        path: Path,
        exclude: np.ndarray | None,
        *,
        kind: str = "global",
        patch_size: int | None = None,
    ) -> np.ndarray:
        from floworacle_server.engine import OracleQuery, kind_oracle

        q = OracleQuery(
            x_t=torch.from_numpy(np.ascontiguousarray(x_t, dtype=np.float64)),
            coeffs=path.coefficients(t),
            exclude=None if exclude is None else torch.from_numpy(np.asarray(exclude, dtype=np.int64)),
            outputs=("velocity",),
        )
        u = kind_oracle(self.dataset, q, kind, patch_size=patch_size).velocity
        assert u is not None
        return u.cpu().numpy()

    def nearest(self, x: np.ndarray, k: int) -> NearestAnswer:
        from floworacle_server.engine import nearest

        r = nearest(self.dataset, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)), k)
        return NearestAnswer(r.indices.cpu().numpy().astype(np.int64), r.distances.cpu().numpy(), r.approximate)


def load_model(spec: str) -> Any:
    """The object named by ``module:attr`` (``attr`` may be dotted) or ``path/to/file.py:attr``.

    Importing runs the module, which is where a model is built and its weights loaded.

    Raises:
        ValueError: a malformed spec, a module that fails to import, or a missing attribute.
    """
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--model {spec!r}: write MODULE:CALLABLE (e.g. mypkg.models:velocity or model.py:net)")
    try:
        if mod_name.endswith(".py"):
            file = FilePath(mod_name)
            if not file.is_file():
                raise ValueError(f"--model {spec!r}: {file} does not exist")
            unique = f"_floworacle_model_{abs(hash(str(file.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, file)
            if module_spec is None or module_spec.loader is None:
                raise ValueError(f"--model {spec!r}: cannot import {file}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(FilePath.cwd()) not in sys.path:
                sys.path.insert(0, str(FilePath.cwd()))  # console scripts leave the working directory off the path
            module = importlib.import_module(mod_name)
    except ValueError:
        raise
    except Exception as exc:  # the user's module failed while importing: say which and why
        raise ValueError(f"--model {spec!r}: importing {mod_name} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
