"""What one GPU batch would launch and synchronise, counted on the CPU with the CUDA settings.

A TorchDispatchMode counts every aten op of one ``oracle()`` call (each is a kernel launch on a
GPU) and every host synchronisation: ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()``),
``nonzero``, boolean-mask indexing, ``unique`` and the other ops whose output size depends on the
data, plus ``Tensor.tolist`` / ``item`` / ``numpy`` (patched: on a CPU tensor they dispatch
nothing). B = 256 queries over N = 50,000 samples of D = 3,072 (CIFAR size) fit one CUDA chunk;
the limits are at most 3 host synchronisations and 400 ops plus 40 per distinct label.

To keep the test seconds-fast, the float64 batched GEMMs of the dense passes return zeros of the
right shape instead of being computed: they run after the batch's host read and nothing reads
their values back to the host, so the ops and synchronisations counted are the same.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import CUDA, Guidance, OracleQuery, oracle

N, D, B, LABELS = 50_000, 3072, 256, 10

_DATA_DEPENDENT = {
    "_local_scalar_dense",
    "nonzero",
    "nonzero_static",
    "is_nonzero",
    "equal",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
    "argwhere",
    "histc",
}


class Launches(TorchDispatchMode):
    """Counts aten ops and host synchronisations (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self._patched: dict[str, Any] = {}

    def __enter__(self) -> Launches:
        for name in ("tolist", "item", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(t: torch.Tensor, *a: Any, _original: Any = original, _name: str = name, **k: Any) -> Any:
                self.syncs[_name] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if name in _DATA_DEPENDENT:
            self.syncs[name] += 1
        if name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            self.syncs[name + "[bool]"] += 1
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
            self.syncs[name] += 1
        if name in ("bmm", "baddbmm_") and args[0].dtype == torch.float64 and args[0].numel() * args[1].shape[-1] > 1e7:
            if name == "baddbmm_":  # the dense pass's accumulation GEMM (see module docstring)
                return args[0]
            return torch.zeros(args[0].shape[0], args[0].shape[1], args[1].shape[2], dtype=torch.float64)
        return func(*args, **(kwargs or {}))

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def _has_bool_index(args: Any) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a):
            return True
    return False


@pytest.fixture(scope="module")
def cifar_size() -> Iterator[Dataset]:
    torch.manual_seed(0)
    labels = np.repeat(np.arange(LABELS), N // LABELS)  # already sorted: no reordering copy
    ds = Dataset.from_arrays("launches", torch.randn(N, D), labels=labels, fingerprint="sha256:launches")
    q = _query(ds, np.full(B, 0.9), np.random.default_rng(1))
    oracle(ds, q, config=CUDA)  # once per data set: its cached facts (norm maxima, class ranges)
    yield ds


def _query(
    ds: Dataset,
    t: np.ndarray,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
    guidance: Guidance | None = None,
) -> OracleQuery:
    c = get_path("linear").coefficients(t)
    x1 = ds.x[torch.from_numpy(rng.integers(0, N, B))].double().numpy()
    xt = c.alpha[:, None] * x1 + c.sigma[:, None] * rng.standard_normal((B, D))
    return OracleQuery(
        x_t=torch.from_numpy(xt).float(),
        coeffs=c,
        t=torch.from_numpy(t),
        labels=None if labels is None else torch.from_numpy(labels),
        guidance=guidance,
        outputs=("velocity",),
    )


@pytest.mark.parametrize("case", ["uniform", "all 0.05", "all 0.9", "conditional", "guided"])
def test_one_batch_launches_few_ops_and_synchronises_at_most_three_times(cifar_size: Dataset, case: str) -> None:
    rng = np.random.default_rng(7)
    uniform = rng.uniform(0.0, 0.999, B)
    labels = rng.integers(0, LABELS, B)
    query = {
        "uniform": lambda: _query(cifar_size, uniform, rng),
        "all 0.05": lambda: _query(cifar_size, np.full(B, 0.05), rng),
        "all 0.9": lambda: _query(cifar_size, np.full(B, 0.9), rng),
        "conditional": lambda: _query(cifar_size, uniform, rng, labels),
        "guided": lambda: _query(cifar_size, uniform, rng, labels, Guidance(scale=2.0, t_lo=0.2, t_hi=0.7)),
    }[case]()
    with Launches() as count:
        res = oracle(cifar_size, query, config=CUDA)
    distinct = len(np.unique(labels)) if case in ("conditional", "guided") else 0
    limit = 400 + 40 * distinct
    assert count.total_syncs <= 3, dict(count.syncs)
    assert count.total_ops <= limit, (count.total_ops, count.ops.most_common(12))
    assert res.velocity is not None and res.velocity.shape == (B, D)
    if case == "uniform":  # the batch really mixes the routes: dense, sparse, lone candidates
        assert 0 < res.refined < B * N
