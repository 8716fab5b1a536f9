"""The SDK's model study (floworacle.study): the model wrapper (torch and numpy, the reversed
convention, bad outputs), the switch rule, the settings' checks, the local-copy check of
ClientData, and the exact oracle itself as the "model" against a real server: its distance to the
training-set oracle is 0, to the leave-one-out and held-out oracles it is not, and its samples
are copies of training samples while held-out samples are not."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sdk_support import SHAPE, linear_ref, settings

from floworacle import OracleClient
from floworacle.study import ClientData, ModelStudy, StudyConfig, as_velocity, first_below, model_study
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import serve_in_thread

D = int(np.prod(SHAPE))


class Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.seen: list[tuple[torch.dtype, tuple[int, ...], bool, bool]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, tuple(x.shape), self.training, torch.is_grad_enabled()))
        return self.w * x + t.reshape(-1, *([1] * (x.ndim - 1)))


def test_as_velocity_torch_and_numpy() -> None:
    x = np.arange(2 * D, dtype=np.float64).reshape(2, D) / 10
    t = np.array([0.25, 0.5])
    net = Lin()
    net.train()
    v = as_velocity(net, SHAPE, batch_rows=1)
    np.testing.assert_allclose(v(x, t), 2 * x + t[:, None])
    # the module's own dtype, the sample shape, eval mode and no autograd; its mode restored
    assert net.seen == [(torch.float64, (1, *SHAPE), False, False)] * 2 and net.training
    seen: list[tuple[type, tuple[int, ...]]] = []

    def f(a: np.ndarray, s: np.ndarray) -> np.ndarray:
        seen.append((type(a), a.shape))
        return -a * s[:, None, None]

    np.testing.assert_allclose(as_velocity(f, SHAPE)(x, t), -x * t[:, None])
    assert seen == [(np.ndarray, (2, *SHAPE))]
    # reversed convention: called with s = 1 - t, the answer negated
    np.testing.assert_allclose(as_velocity(f, SHAPE, convention="reversed")(x, t), x * (1 - t)[:, None])
    # a function of tensors
    g = as_velocity(lambda a, s: a.float() * 0 + s[:, None, None], SHAPE, inputs="torch")
    np.testing.assert_allclose(g(x, t), np.repeat(t[:, None], D, axis=1))


def test_as_velocity_errors() -> None:
    x, t = np.zeros((3, D)), np.full(3, 0.5)
    with pytest.raises(ValueError, match=r"returned \(3, 1\) for x_t of shape \(3, 3, 4\)"):
        as_velocity(lambda a, s: np.zeros((3, 1)), SHAPE)(x, t)
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_velocity(lambda a, s: a * np.nan, SHAPE)(x, t)
    with pytest.raises(ValueError, match="is a class"):
        as_velocity(Lin, SHAPE)
    with pytest.raises(ValueError, match="must be callable"):
        as_velocity(3, SHAPE)
    with pytest.raises(ValueError, match="convention"):
        as_velocity(Lin(), SHAPE, convention="sd3")
    with pytest.raises(ValueError, match="inputs"):
        as_velocity(Lin(), SHAPE, inputs="jax")


def test_first_below() -> None:
    t = np.array([0.1, 0.2, 0.3, 0.4])
    assert first_below(t, np.array([1.0, 0.8, 0.4, 0.1]), 0.5) == pytest.approx(0.275)
    assert first_below(t, np.array([0.3, 0.8, 0.4, 0.1]), 0.5) == 0.1
    assert first_below(t, np.array([1.0, 0.8, 0.6, 0.5]), 0.5) is None
    assert first_below(t, np.array([1.0, np.nan, 0.2, 0.1]), 0.5) == 0.3  # nan is not below


def test_config_checks() -> None:
    for kw, msg in [
        ({"t_grid": (0.5,)}, "at least two"),
        ({"t_grid": (0.5, 1.0)}, "outside"),
        ({"queries_per_t": 0}, "must be >= 1"),
        ({"method": "rk4"}, "method must be one of"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"threshold": 0.0}, "copy threshold"),
        ({"switch_ratio": 0.0}, "switch_ratio"),
        ({"path": "vp"}, "unknown path"),
    ]:
        with pytest.raises(ValueError, match=msg):
            StudyConfig(**kw).validated()  # type: ignore[arg-type]


def _sets(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = 2.0 * rng.standard_normal((3, D))
    tr = centers[rng.integers(0, 3, 150)] + 0.5 * rng.standard_normal((150, D))
    ho = centers[rng.integers(0, 3, 60)] + 0.5 * rng.standard_normal((60, D))
    return tr.astype(np.float32).astype(np.float64), ho.astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """One server holding both sets under two names."""
    tr, ho = _sets()
    store = DatasetStore(
        [
            Dataset.from_arrays("tr", tr.astype(np.float32).reshape(-1, *SHAPE)),
            Dataset.from_arrays("ho", ho.astype(np.float32).reshape(-1, *SHAPE)),
        ]
    )
    with serve_in_thread(settings(), store) as srv:
        yield srv.address, tr, ho


def test_client_data_checks_the_local_copy(pair) -> None:
    address, tr, _ = pair
    with OracleClient(address) as c:
        with pytest.raises(ValueError, match="do not match data set 'tr' on the server"):
            ClientData(c, "tr", tr[:100])
        shuffled = tr[::-1].copy()
        data = ClientData(c, "tr", shuffled)
        with pytest.raises(ValueError, match="local row 0's nearest served sample is 149"):
            data.samples(np.arange(3))
        ok = ClientData(c, "tr", tr.reshape(-1, *SHAPE))
        np.testing.assert_array_equal(ok.samples(np.array([4, 2])), tr[[4, 2]])
        assert ok.num_samples == 150 and ok.sample_shape == SHAPE and ok.fingerprint.startswith("sha256:")


def test_the_oracle_as_its_own_model(pair) -> None:
    address, tr, ho = pair

    def oracle(x: np.ndarray, t: np.ndarray) -> np.ndarray:  # the reference written for the SDK tests
        return linear_ref(tr, x.reshape(x.shape[0], -1), t).velocity

    cfg = StudyConfig(t_grid=(0.2, 0.5, 0.8, 0.95), queries_per_t=16, num_samples=40, steps=20, seed=1)
    with OracleClient(address) as c:
        rep = model_study(oracle, ClientData(c, "tr", tr), ClientData(c, "ho", ho), cfg, name="oracle")
    v = rep.velocity
    scale = v["train"]["heldout"]
    assert np.all(v["train"]["train"] <= 1e-16 * (1 + scale))  # the server's exact oracle equals the reference
    assert np.all(v["heldout"]["train"] <= 1e-16 * (1 + v["heldout"]["heldout"]))
    # once the posterior collapses, the training oracle is far from its leave-one-out and held-out cousins
    assert v["train"]["loo"][-1] > 1e6 * v["train"]["train"][-1]
    assert rep.switch["train"] == 0.2 and rep.switch["heldout"] == 0.2  # d_train = 0 < d_heldout / 2 everywhere
    js = rep.to_json()
    assert js["model"] == "oracle" and js["train"]["name"] == "tr" and js["heldout"]["N"] == 60
    assert js["fit_ratio"][-1] is not None and js["fit_ratio"][-1] < 1e-10
    # the oracle's ODE lands on training samples; held-out samples are not copies of them
    assert rep.samples["copy_share"] == 1.0 and rep.samples["heldout_copy_share"] < 0.2
    assert rep.samples["nearest_train_mean"] < 1e-2 < rep.samples["heldout_nearest_train_mean"]
    assert "model switch" in rep.summary()


def test_study_refuses_mismatched_sets(pair) -> None:
    address, tr, ho = pair
    with OracleClient(address) as c:
        a = ClientData(c, "tr", tr)

        class Small:
            name, fingerprint, num_samples, sample_shape = "x", "", 5, (2,)

        with pytest.raises(ValueError, match="different sizes"):
            ModelStudy(a, Small())  # type: ignore[arg-type]
