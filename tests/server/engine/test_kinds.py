"""One entry point for every oracle kind: outputs from x1_hat, guidance, schedules, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle.paths import custom_coefficients, get_path
from floworacle_server.data import Dataset, load_digits
from floworacle_server.engine import (
    KINDS,
    Guidance,
    OracleQuery,
    kind_oracle,
    kind_x1,
    oracle,
    patch_schedule,
)

OUT = ("velocity", "x1_hat", "eps_hat", "score")


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_digits()


@pytest.fixture(scope="module")
def few():  # type: ignore[no-untyped-def]
    """300 digits, for the equivariant oracle's N (H W)^2 cost."""
    d = load_digits()
    rows = torch.arange(0, d.num_samples, 6)
    return Dataset.from_arrays("few", d.x[rows], d.labels[rows], image_shape=(1, 8, 8))


def _query(ds, t: np.ndarray, seed: int = 0, **kw) -> OracleQuery:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    c = get_path("cosine").coefficients(t)
    x1 = ds.x[torch.from_numpy(rng.integers(0, ds.num_samples, len(t)))].double().numpy()
    xt = c.alpha[:, None] * x1 + c.sigma[:, None] * rng.standard_normal(x1.shape)
    return OracleQuery(torch.from_numpy(xt), c, t=torch.from_numpy(t), outputs=OUT, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_follow_from_x1_hat(digits, few, kind: str) -> None:  # type: ignore[no-untyped-def]
    if kind == "equivariant":
        digits = few
    t = np.array([0.1, 0.4, 0.7, 0.95])
    q = _query(digits, t)
    res = kind_oracle(digits, q, kind, patch_size=3 if kind in ("local", "equivariant") else None)
    x = q.x_t.numpy()
    x1 = res.x1_hat.numpy()
    c = q.coeffs
    a, s = c.alpha[:, None], c.sigma[:, None]
    # oracle-math.md, in float64 numpy
    np.testing.assert_allclose(
        res.velocity.numpy(), c.velocity_x1[:, None] * x1 + c.velocity_xt[:, None] * x, atol=1e-12
    )
    np.testing.assert_allclose(res.eps_hat.numpy(), (x - a * x1) / s, atol=1e-12)
    np.testing.assert_allclose(res.score.numpy(), (a * x1 - x) / s**2, atol=1e-10)
    assert (res.velocity_error_bound.numpy() >= np.abs(c.velocity_x1) * res.x1_hat_error_bound.numpy()).all()
    if kind == "global":
        np.testing.assert_array_equal(x1, oracle(digits, q).x1_hat.numpy())
    # the kinds differ from each other in the middle of the path
    if kind != "global":
        assert np.abs(x1 - oracle(digits, q).x1_hat.numpy())[1:3].max() > 1e-3


@pytest.mark.parametrize("kind", ["local", "linear"])
def test_guidance_mixes_unconditional_and_conditional(digits, kind: str) -> None:  # type: ignore[no-untyped-def]
    t = np.array([0.2, 0.5, 0.8, 0.9])
    labels = torch.tensor([3, 3, -1, 7])
    q = _query(digits, t, labels=labels, guidance=Guidance(2.0, 0.3, 0.85))
    p = 5 if kind == "local" else None
    res = kind_oracle(digits, q, kind, patch_size=p)
    c = q.coeffs
    al, sg = torch.from_numpy(c.alpha), torch.from_numpy(c.sigma)
    cond = kind_x1(digits, kind, q.x_t, al, sg, patch_size=p, labels=labels).x1_hat.numpy()
    unc = kind_x1(digits, kind, q.x_t, al, sg, patch_size=p).x1_hat.numpy()
    want = cond.copy()
    want[1] = unc[1] + 2.0 * (cond[1] - unc[1])  # inside [0.3, 0.85] and labelled: guided
    np.testing.assert_allclose(res.x1_hat.numpy(), want, atol=1e-12)  # t = 0.2, 0.9 outside: conditional


def test_patch_schedule_over_t(few) -> None:  # type: ignore[no-untyped-def]
    t = np.array([0.0, 0.3, 0.5, 0.79, 0.8, 0.99])
    sizes = patch_schedule(t, [(0.0, 7), (0.5, 5), (0.8, 3)])
    assert sizes.tolist() == [7, 7, 5, 5, 3, 3]
    assert patch_schedule(t, 5).tolist() == [5] * 6
    with pytest.raises(ValueError, match="first at 0.0"):
        patch_schedule(t, [(0.2, 5)])
    q = _query(few, t)
    per = kind_oracle(few, q, "equivariant", patch_size=sizes)
    c = q.coeffs
    for p in (7, 5, 3):
        sel = np.flatnonzero(sizes == p)
        coeffs = custom_coefficients(c.alpha[sel], c.sigma[sel], c.d_alpha[sel], c.d_sigma[sel])
        one = kind_oracle(few, OracleQuery(q.x_t[sel], coeffs, outputs=OUT), "equivariant", patch_size=p)
        np.testing.assert_allclose(per.x1_hat.numpy()[sel], one.x1_hat.numpy(), atol=1e-13)


def test_refusals(digits) -> None:  # type: ignore[no-untyped-def]
    q = _query(digits, np.array([0.5]))
    with pytest.raises(ValueError, match="unknown oracle kind 'nonlocal'"):
        kind_oracle(digits, q, "nonlocal")
    with pytest.raises(ValueError, match="needs a patch size"):
        kind_oracle(digits, q, "local")
    with pytest.raises(ValueError, match="takes no patch size"):
        kind_oracle(digits, q, "linear", patch_size=3)
    with pytest.raises(ValueError, match="diagnostics of the global posterior"):
        kind_oracle(digits, OracleQuery(q.x_t, q.coeffs, outputs=("velocity", "topk"), top_k=2), "local", patch_size=3)
    with pytest.raises(ValueError, match="takes neither"):
        kind_oracle(digits, q, "global", patch_size=3)
