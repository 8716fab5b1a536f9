"""Every method of the sync client over a real channel, checked against the float64 reference."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from sdk_support import CLASSES, SHAPE, Data, linear_ref, queries, reference

from floworacle import OracleClient, OracleError, paths
from floworacle_server.service.testing import RunningServer


@pytest.fixture
def client(server: RunningServer) -> OracleClient:
    with OracleClient(server.address, timeout=30) as c:
        yield c  # type: ignore[misc]


def test_velocity_float64_matches_reference(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 16, seed=1)
    u = client.velocity(x_t, t)
    assert isinstance(u, np.ndarray) and u.dtype == np.float64 and u.shape == x_t.shape
    np.testing.assert_allclose(u, linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)


def test_velocity_keeps_sample_shape(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 4, seed=2)
    u = client.velocity(x_t.reshape(4, *SHAPE), t)
    assert u.shape == (4, *SHAPE)
    np.testing.assert_allclose(u.reshape(4, -1), linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)


def test_scalar_t_broadcasts(client: OracleClient, data: Data) -> None:
    x_t, _ = queries(data, 3, seed=3)
    u = client.velocity(x_t, 0.4)
    np.testing.assert_allclose(u, linear_ref(data.x, x_t, np.full(3, 0.4)).velocity, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(np.float32, 2e-6), (np.float16, 2e-3), (np.float64, 1e-9)],
)
def test_numpy_dtypes_preserved(client: OracleClient, data: Data, dtype: type, rtol: float) -> None:
    x_t, t = queries(data, 8, seed=4)
    x: np.ndarray = x_t.astype(dtype)
    u = client.velocity(x, t)
    assert isinstance(u, np.ndarray) and u.dtype == dtype
    want = linear_ref(data.x, x.astype(np.float64), t).velocity
    scale = np.abs(want).max()
    np.testing.assert_allclose(u.astype(np.float64), want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float64, 1e-9)],
)
def test_torch_dtypes_preserved(client: OracleClient, data: Data, dtype: torch.dtype, tol: float) -> None:
    x_t, t = queries(data, 8, seed=5)
    x = torch.from_numpy(x_t).to(dtype)
    u = client.velocity(x, torch.from_numpy(t))
    assert isinstance(u, torch.Tensor) and u.dtype == dtype and u.device == x.device
    want = linear_ref(data.x, x.double().numpy(), t).velocity
    err = np.abs(u.double().numpy() - want).max() / np.abs(want).max()
    assert err <= tol


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_wire_dtype_halves_bytes_and_converts_back(server: RunningServer, data: Data, wire: str) -> None:
    x_t, t = queries(data, 8, seed=6)
    x = x_t.astype(np.float32)
    with OracleClient(server.address, wire_dtype=wire) as c:
        u = c.velocity(x, t)
    assert u.dtype == np.float32
    # the server saw the wire-rounded queries; answer rounded to the wire dtype
    xw = torch.from_numpy(x).to(getattr(torch, wire)).double().numpy()
    want = linear_ref(data.x, xw, t).velocity
    tol = 4e-3 if wire == "float16" else 2e-2
    assert np.abs(u - want).max() / np.abs(want).max() <= tol
    assert np.abs(u - want).max() > 0  # it really travelled in 16 bits


def test_predict_all_outputs(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 6, seed=7, t_lo=0.2, t_hi=0.8)
    p = client.predict(x_t, t, top_k=5)
    ref = linear_ref(data.x, x_t, t)
    for name in ("velocity", "x1_hat", "eps_hat", "score"):
        np.testing.assert_allclose(getattr(p, name), getattr(ref, name), rtol=1e-6, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(p.entropy, ref.entropy, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(p.ess, ref.ess, rtol=1e-6)
    order = np.argsort(-ref.gamma, axis=1)[:, :5]
    np.testing.assert_allclose(p.topk_weights, np.take_along_axis(ref.gamma, order, 1), rtol=1e-6, atol=1e-12)
    top1 = np.take_along_axis(ref.gamma, p.topk_indices[:, :1], 1)[:, 0]
    np.testing.assert_allclose(top1, ref.gamma.max(1), rtol=1e-9)  # indices are original data set rows
    assert p.topk_indices.dtype == np.int64
    assert p.fingerprint.startswith("sha256:") and p.dataset == "blobs" and p.precision == "exact"
    assert p.x1_hat_error_bound is not None and (p.x1_hat_error_bound < 1e-6).all()


def test_predict_subset_leaves_rest_none(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 3, seed=8)
    p = client.predict(x_t, t, outputs=("x1_hat", "ess"))
    assert p.velocity is None and p.score is None and p.topk_indices is None and p.entropy is None
    np.testing.assert_allclose(p.x1_hat, linear_ref(data.x, x_t, t).x1_hat, rtol=1e-6, atol=1e-9)


def test_predict_torch_outputs(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 4, seed=9)
    p = client.predict(torch.from_numpy(x_t).float(), torch.from_numpy(t), top_k=2)
    assert p.velocity.dtype == torch.float32 and p.topk_indices.dtype == torch.int64
    assert p.ess.dtype == torch.float64


def test_class_conditional_and_guided(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 6, seed=10, t_lo=0.3, t_hi=0.7)
    y = np.arange(6) % CLASSES
    mask = data.labels[None, :] == y[:, None]
    cond = linear_ref(data.x, x_t, t, mask).velocity
    uncond = linear_ref(data.x, x_t, t).velocity
    np.testing.assert_allclose(client.velocity(x_t, t, labels=y), cond, rtol=1e-6, atol=1e-8)
    w = 2.0
    lo, hi = 0.45, 1.0
    inside = ((t >= lo) & (t <= hi))[:, None]
    want = np.where(inside, uncond + w * (cond - uncond), cond)
    got = client.velocity(x_t, t, labels=y, guidance=w, guidance_interval=(lo, hi))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert inside.any() and (~inside).any()


def test_cosine_sigma_min_and_custom_paths(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 5, seed=11)
    h = np.pi / 2
    want = reference(data.x, x_t, np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)).velocity
    np.testing.assert_allclose(client.velocity(x_t, t, path="cosine"), want, rtol=1e-6, atol=1e-8)
    sm = 0.01
    want = reference(data.x, x_t, t, 1 - (1 - sm) * t, np.ones_like(t), np.full_like(t, -(1 - sm))).velocity
    np.testing.assert_allclose(client.velocity(x_t, t, sigma_min=sm), want, rtol=1e-6, atol=1e-8)
    coef = {"alpha": 0.5 * t, "sigma": 1 - 0.5 * t, "d_alpha": np.full_like(t, 0.7), "d_sigma": np.full_like(t, -0.2)}
    want = reference(data.x, x_t, coef["alpha"], coef["sigma"], coef["d_alpha"], coef["d_sigma"]).velocity
    np.testing.assert_allclose(client.velocity(x_t, None, coefficients=coef), want, rtol=1e-6, atol=1e-8)


def test_reversed_convention_matches_standard(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 6, seed=12)
    s = 1 - t  # the same points in SD3 / Flux time
    standard = client.velocity(x_t, t)
    rev = client.velocity(x_t, s, convention="reversed")
    np.testing.assert_allclose(rev, -standard, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        rev, paths.velocity_to_reversed(linear_ref(data.x, x_t, t).velocity), rtol=1e-6, atol=1e-8
    )
    # and it is the reversed target itself: for x_s = (1 - s) x_data + s noise near one sample, v ~ noise - x_data
    p = client.predict(x_t, s, convention="reversed", outputs=("velocity", "x1_hat"))
    np.testing.assert_allclose(p.x1_hat, linear_ref(data.x, x_t, t).x1_hat, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="reversed"):
        client.velocity(x_t, s, convention="reversed", path="cosine")


def test_nearest(client: OracleClient, data: Data) -> None:
    rng = np.random.default_rng(13)
    x = data.x[:5] + 0.01 * rng.standard_normal((5, data.x.shape[1]))
    nb = client.nearest(x, 3)
    d = np.linalg.norm(x[:, None, :] - data.x[None], axis=-1)
    order = np.argsort(d, axis=1)[:, :3]
    np.testing.assert_array_equal(nb.indices, order)
    np.testing.assert_allclose(nb.distances, np.take_along_axis(d, order, 1), rtol=1e-6)
    np.testing.assert_array_equal(nb.labels, data.labels[order])
    assert nb.indices[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_nearest_at_time_is_top_posterior(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 5, seed=14, t_lo=0.5, t_hi=0.9)
    nb = client.nearest(torch.from_numpy(x_t), 1, t=t)
    assert isinstance(nb.indices, torch.Tensor)
    np.testing.assert_array_equal(nb.indices[:, 0].numpy(), linear_ref(data.x, x_t, t).gamma.argmax(1))


def test_datasets_and_describe(client: OracleClient) -> None:
    (info,) = client.datasets()
    assert info.name == "blobs" and info.num_samples == 240 and info.sample_shape == SHAPE
    assert info.dim == 12 and info.num_classes == CLASSES and info.is_default
    assert info.fingerprint.startswith("sha256:")
    assert client.describe("blobs") == info
    assert client.describe() == info  # the server's default
    with pytest.raises(OracleError) as e:
        client.describe("nope")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_fingerprint_pin(server: RunningServer, data: Data) -> None:
    x_t, t = queries(data, 2, seed=15)
    with OracleClient(server.address) as c:
        fp = c.describe("blobs").fingerprint
    with OracleClient(server.address, dataset="blobs", fingerprint=fp) as c:
        assert c.velocity(x_t, t).shape == x_t.shape
    with OracleClient(server.address, dataset="blobs", fingerprint="sha256:" + "0" * 64) as c:
        with pytest.raises(OracleError) as e:
            c.velocity(x_t, t)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_errors_carry_status(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 2, seed=16)
    with pytest.raises(OracleError) as e:
        client.velocity(x_t, t, dataset="missing")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "missing" in e.value.details
    with pytest.raises(OracleError) as e:
        client.velocity(x_t[:, :5], t)  # wrong dimension
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(OracleError) as e:
        client.velocity(x_t, t, labels=[0, 7])  # unknown class
    assert e.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_bad_input_fails_before_sending(client: OracleClient, data: Data) -> None:
    x_t, t = queries(data, 2, seed=17)
    with pytest.raises(ValueError, match="outside"):
        client.velocity(x_t, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        client.velocity(x_t, np.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        client.velocity(x_t.astype(np.int64), t)
    with pytest.raises(ValueError, match="x\\[None\\]"):
        client.velocity(x_t[0], t[0])
    with pytest.raises(ValueError, match="top_k"):
        client.predict(x_t, t, outputs=("topk",), top_k=0)
    with pytest.raises(ValueError, match="guidance needs labels"):
        client.velocity(x_t, t, guidance=2.0)


def test_closed_client_refuses(server: RunningServer, data: Data) -> None:
    c = OracleClient(server.address)
    c.close()
    c.close()
    with pytest.raises(OracleError, match="closed") as e:
        c.datasets()
    assert e.value.code == grpc.StatusCode.CANCELLED


def test_numpy_only_without_torch(server: RunningServer, data: Data) -> None:
    """The SDK works where torch is not installed (torch imports are blocked in a subprocess)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, floworacle\n"
        f"c = floworacle.OracleClient({server.address!r})\n"
        "u = c.velocity(np.zeros((2, 12), np.float32), 0.5, wire_dtype='bfloat16')\n"
        "n = c.nearest(np.zeros((2, 12)), 1)\n"
        "c.close()\n"
        "assert u.dtype == np.float32 and u.shape == (2, 12) and n.indices.shape == (2, 1)\n"
        "print('ok', [m for m in sys.modules if m.startswith('torch')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok ['torch']"  # only the blocked placeholder
