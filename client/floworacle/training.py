"""Training helpers (torch): a prefetcher that asks the oracle for the targets of the next batches
while the current one trains, and flow-matching losses against the oracle target, the
conditional target, or a blend of the two chosen per t.

Convention as everywhere: t = 0 noise, t = 1 data, ``x_t = alpha_t x1 + sigma_t x0``; the
conditional target is ``u_t(x_t | x1) = d_alpha_t x1 + d_sigma_t x0`` (``x1 - x0`` on linear).
Importing this module needs torch; the rest of the SDK does not.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from floworacle import paths

__all__ = [
    "OracleBatch",
    "OraclePrefetcher",
    "sample_x_t",
    "conditional_target",
    "blend_weight",
    "per_sample_mse",
    "oracle_loss",
]

TSampler = Callable[[int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class OracleBatch:
    """One training batch with both targets.

    Attributes:
        x1: (B, *shape) data.
        x0: (B, *shape) noise.
        t: (B,) float32 times on x1's device.
        x_t: (B, *shape) ``alpha_t x1 + sigma_t x0``.
        labels: (B,) int64 labels when the source yields them, else None.
        oracle: (B, *shape) oracle velocity at (x_t, t) over the server's data set.
        conditional: (B, *shape) ``d_alpha_t x1 + d_sigma_t x0``.
    """

    x1: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    labels: torch.Tensor | None
    oracle: torch.Tensor
    conditional: torch.Tensor


def _coef(t: torch.Tensor, like: torch.Tensor, path: str, sigma_min: float) -> paths.PathCoefficients:
    return paths.get_path(path, sigma_min).coefficients(t.detach().double().cpu().numpy())


def _bcast(v: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * (like.ndim - 1))


def sample_x_t(
    x1: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    path: str = "linear",
    sigma_min: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, x0)`` with ``x_t = alpha_t x1 + sigma_t x0``; x0 ~ N(0, I) is drawn when not given.

    Shapes: x1 (B, *shape), t (B,).
    """
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    c = _coef(t, x1, path, sigma_min)
    return _bcast(c.alpha, x1) * x1 + _bcast(c.sigma, x1) * x0, x0


def conditional_target(
    x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, *, path: str = "linear", sigma_min: float = 0.0
) -> torch.Tensor:
    """``d_alpha_t x1 + d_sigma_t x0``: (B, *shape); ``x1 - (1 - sigma_min) x0`` on linear."""
    c = _coef(t, x1, path, sigma_min)
    return _bcast(c.d_alpha, x1) * x1 + _bcast(c.d_sigma, x1) * x0


def blend_weight(
    t: torch.Tensor, *, switch: float | None = None, weight: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Weight of the oracle target per query, (B,) in [0, 1].

    ``weight(t)`` when given; else 1 for ``t < switch`` and 0 from ``switch`` on (oracle in the
    navigation stage, the conditional target once the posterior has collapsed); else all 1.
    """
    if weight is not None and switch is not None:
        raise ValueError("give either switch or weight, not both")
    if weight is not None:
        w = torch.as_tensor(weight(t), dtype=torch.float32, device=t.device)
        if w.shape != t.shape or bool(((w < 0) | (w > 1)).any()):
            raise ValueError("weight(t) must return values in [0, 1] of the same shape as t")
        return w
    if switch is not None:
        return (t < switch).to(torch.float32)
    return torch.ones_like(t, dtype=torch.float32)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of each sample over all its other dimensions."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return (prediction - target.to(prediction.dtype)).pow(2).flatten(1).mean(dim=1)


def oracle_loss(
    prediction: torch.Tensor,
    batch: OracleBatch,
    *,
    switch: float | None = None,
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE against ``w(t) * oracle + (1 - w(t)) * conditional`` (see :func:`blend_weight`).

    prediction: (B, *shape) model velocity. reduction: "mean" (scalar) or "none" ((B,)).
    """
    w = _bcast(blend_weight(batch.t, switch=switch, weight=weight), batch.oracle)
    target = w * batch.oracle + (1 - w) * batch.conditional.to(batch.oracle.dtype)
    losses = per_sample_mse(prediction, target)
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class OraclePrefetcher:
    """Iterate over training batches with their oracle targets already fetched.

    A background thread draws t and x0 for each batch of ``source``, builds x_t, and asks the
    oracle (``client.velocity``) while earlier batches train; at most ``lookahead`` finished
    batches wait, so memory stays bounded. Errors of the thread are raised in the consumer.

    Args:
        client: an :class:`floworacle.OracleClient`.
        source: iterable of x1 tensors (B, *shape) or ``(x1, labels)`` pairs.
        lookahead: finished batches that may wait (>= 1).
        t_sampler: ``f(B, generator) -> (B,)`` times; default uniform on [0, t_max] of the path.
        class_conditional: send the labels, so the target is the class-conditional oracle.
        seed: seed of the thread's generator (t and x0 draws are reproducible).
        path, sigma_min, dataset, and ``velocity_kwargs``: passed to ``client.velocity``.

    Use ``with OraclePrefetcher(...) as batches: for b in batches: ...`` or call :meth:`close`.
    """

    def __init__(
        self,
        client: Any,
        source: Iterable[Any],
        *,
        lookahead: int = 2,
        path: str = "linear",
        sigma_min: float = 0.0,
        dataset: str | None = None,
        t_sampler: TSampler | None = None,
        class_conditional: bool = False,
        seed: int = 0,
        **velocity_kwargs: Any,
    ) -> None:
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self._client = client
        self._source = source
        self._path = path
        self._sigma_min = sigma_min
        self._dataset = dataset
        self._class_conditional = class_conditional
        self._kwargs = velocity_kwargs
        t_max = paths.get_path(path, sigma_min).t_max
        self._t_sampler: TSampler = t_sampler or (lambda b, g: torch.rand(b, generator=g, dtype=torch.float64) * t_max)
        self._generator = torch.Generator().manual_seed(seed)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=lookahead)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _prepare(self, item: Any) -> OracleBatch:
        if isinstance(item, (tuple, list)):
            x1, labels = item[0], item[1]
        else:
            x1, labels = item, None
        b = int(x1.shape[0])
        t = torch.as_tensor(self._t_sampler(b, self._generator)).reshape(b)
        x_t, x0 = sample_x_t(x1, t, path=self._path, sigma_min=self._sigma_min, generator=self._generator)
        oracle = self._client.velocity(
            x_t,
            t.double(),
            dataset=self._dataset,
            path=self._path,
            sigma_min=self._sigma_min,
            labels=labels if self._class_conditional else None,
            **self._kwargs,
        )
        cond = conditional_target(x1, x0, t, path=self._path, sigma_min=self._sigma_min)
        return OracleBatch(x1, x0, t.to(torch.float32).to(x1.device), x_t, labels, oracle, cond)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set() or not self._put(self._prepare(item)):
                    return
            self._put(_End())
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[OracleBatch]:
        if self._thread is not None:
            raise RuntimeError("an OraclePrefetcher can be iterated once; create a new one per epoch")
        self._thread = threading.Thread(target=self._work, name="floworacle-prefetch", daemon=True)
        self._thread.start()
        while True:
            got = self._queue.get()
            if isinstance(got, _End):
                return
            if isinstance(got, _Failure):
                raise got.exc
            yield got

    def close(self) -> None:
        """Stop the background thread (it finishes the request in flight, then exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> OraclePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
