"""Training helpers: conditional targets and blends against hand-written formulas; the prefetcher
over a real server (targets equal the float64 reference at its own x_t, bounded lookahead, errors
surface in the consumer)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from sdk_support import CLASSES, Data, N, linear_ref

from floworacle import OracleClient
from floworacle.training import (
    OracleBatch,
    OraclePrefetcher,
    blend_weight,
    conditional_target,
    oracle_loss,
    sample_x_t,
)
from floworacle_server.service.testing import RunningServer


def test_conditional_targets() -> None:
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conditional_target(x1, x0, t), x1 - x0)
    torch.testing.assert_close(conditional_target(x1, x0, t, sigma_min=0.1), x1 - 0.9 * x0)
    h = np.pi / 2
    want = h * torch.cos(h * t)[:, None] * x1 - h * torch.sin(h * t)[:, None] * x0
    torch.testing.assert_close(conditional_target(x1, x0, t, path="cosine"), want)
    x_t, x0b = sample_x_t(x1, t, x0)
    assert x0b is x0
    torch.testing.assert_close(x_t, t[:, None] * x1 + (1 - t[:, None]) * x0)


def test_blend_weight_and_loss() -> None:
    t = torch.tensor([0.1, 0.5, 0.9])
    assert blend_weight(t, switch=0.5).tolist() == [1.0, 0.0, 0.0]
    assert blend_weight(t).tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(blend_weight(t, weight=lambda s: 1 - s), 1 - t)
    with pytest.raises(ValueError, match="either"):
        blend_weight(t, switch=0.5, weight=lambda s: s)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend_weight(t, weight=lambda s: 2 * s)
    g = torch.Generator().manual_seed(1)
    oracle, cond, pred = (torch.randn(3, 4, generator=g) for _ in range(3))
    z = torch.zeros(3, 4)
    b = OracleBatch(z, z, t, z, None, oracle, cond)
    w = (1 - t)[:, None]
    want = ((pred - (w * oracle + (1 - w) * cond)) ** 2).mean(dim=1)
    torch.testing.assert_close(oracle_loss(pred, b, weight=lambda s: 1 - s, reduction="none"), want)
    torch.testing.assert_close(
        oracle_loss(pred, b, switch=0.5),
        torch.cat([((pred - oracle) ** 2).mean(1)[:1], ((pred - cond) ** 2).mean(1)[1:]]).mean(),
    )
    with pytest.raises(ValueError, match="reduction"):
        oracle_loss(pred, b, reduction="sum")


def test_prefetcher_targets_match_reference(server: RunningServer, data: Data) -> None:
    x = torch.from_numpy(data.x).float()
    labels = torch.from_numpy(data.labels)
    src = [(x[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
    with OracleClient(server.address) as c, OraclePrefetcher(c, src, lookahead=2, seed=3) as stream:
        got = list(stream)
    assert len(got) == 4
    for b, (x1, y) in zip(got, src, strict=True):
        assert b.x1 is x1 and torch.equal(b.labels, y)
        t64 = b.t.double()
        torch.testing.assert_close(b.x_t, (b.t[:, None] * x1 + (1 - b.t[:, None]) * b.x0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.conditional, x1 - b.x0)
        ref = linear_ref(data.x, b.x_t.double().numpy(), t64.numpy())
        np.testing.assert_allclose(b.oracle.double().numpy(), ref.velocity, rtol=2e-4, atol=2e-4)
        assert b.oracle.dtype == torch.float32
        assert float(b.t.min()) >= 0 and float(b.t.max()) <= 0.9999


def test_prefetcher_class_conditional(server: RunningServer, data: Data) -> None:
    x = torch.from_numpy(data.x).float()
    y = torch.from_numpy(data.labels)
    with OracleClient(server.address) as c:
        (b,) = list(
            OraclePrefetcher(c, [(x[:8], y[:8])], class_conditional=True, t_sampler=lambda n, g: torch.full((n,), 0.5))
        )
    mask = data.labels[None, :] == data.labels[:8, None]
    ref = linear_ref(data.x, b.x_t.double().numpy(), np.full(8, 0.5), mask)
    np.testing.assert_allclose(b.oracle.double().numpy(), ref.velocity, rtol=2e-4, atol=2e-4)
    assert CLASSES > 1 and N > 8


def test_prefetcher_lookahead_is_bounded(server: RunningServer, data: Data) -> None:
    x = torch.from_numpy(data.x).float()
    pulled = []

    def source():
        for i in range(20):
            pulled.append(i)
            yield x[:4]

    with OracleClient(server.address) as c:
        pf = OraclePrefetcher(c, source(), lookahead=2)
        it = iter(pf)
        next(it)
        time.sleep(0.5)  # the thread runs ahead, but only by the lookahead (+1 being prepared)
        assert len(pulled) <= 1 + 2 + 1
        pf.close()
        assert not any(t.name == "floworacle-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetcher_errors_reach_the_consumer(server: RunningServer) -> None:
    def source():
        yield torch.zeros(2, 5)  # wrong dimension: the server answers INVALID_ARGUMENT

    with OracleClient(server.address) as c, OraclePrefetcher(c, source()) as pf:
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            list(pf)
