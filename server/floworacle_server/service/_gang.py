"""The gang: one data set sharded over the processes of a torch.distributed group, one answer.

``floworacle serve`` started by ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT) with WORLD_SIZE > 1 joins a gang: NCCL on GPUs, gloo on
CPUs. Every rank holds one shard of each data set (:mod:`floworacle_server.data._shard`: its
share of every class's rows). Rank 0 serves gRPC, batches, metrics and health; for each merged
batch it broadcasts the batch to the other ranks, every rank computes its shard's partials, and
collectives merge them into the single-process answer:

1. an agreement round (all-reduce, max) of each rank's status, so that a batch one shard cannot
   compute (a data-dependent refusal) is refused by every rank alike instead of leaving the
   others waiting in a collective;
2. the partials' merge (:func:`merge_partials`): all-reduce (max) of the running maxima, each
   rank rescales its sums to them, all-reduce (sum) of the sums and of the variance's between
   terms, all-gather of the top-k (indices already in the data set's original order) and a top-k
   of the union; the logit-error bounds all-reduce (max);
3. nearest queries: each rank's exact top-k of its shard, all-gathered and merged by distance.

A rank that dies makes the next collective fail at once (gloo: connection closed), one that hangs
after ``gang_timeout_s``: rank 0 answers the batch with UNAVAILABLE (never a partial answer),
turns health NOT_SERVING and exits non-zero so the orchestrator restarts the group. SIGTERM to
rank 0 drains its in-flight work and then stops every rank; the other ranks ignore SIGTERM and
keep computing until rank 0 stops them (launchers signal every rank of a group at once).
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GangSpec", "Gang", "GangBroken"]

log = logging.getLogger(__name__)

#: Status codes of the agreement round (a rank's outcome for one batch, max over the gang).
_OK, _REFUSED = 0, 1


class GangBroken(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the group was torn down."""


@dataclass(frozen=True)
class GangSpec:
    """Where this process sits in its gang, as the launcher's environment says."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    timeout_s: float
    backend: str  # "gloo" or "nccl"

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


class Gang:
    """This process's membership of a gang: the process group, the collectives, the command
    loop of the non-zero ranks. All collectives of a gang run on one thread per rank (rank 0: the
    batcher's engine thread), in the same order on every rank."""

    def __init__(self, spec: GangSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self._lock = threading.Lock()
        self._broken: str | None = None

    # -- membership ---------------------------------------------------------------------------
    def join(self) -> None:
        """Join the process group (blocks until every rank has joined or the timeout passes)."""
        s = self.spec
        log.info("joining a gang of %d as rank %d (%s, %s)", s.world_size, s.rank, s.backend, s.init_method)
        dist.init_process_group(
            s.backend,
            init_method=s.init_method,
            rank=s.rank,
            world_size=s.world_size,
            timeout=datetime.timedelta(seconds=s.timeout_s),
        )

    def leave(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group cannot always be torn down cleanly; the process ends anyway
                log.debug("process group teardown failed", exc_info=True)

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def broken(self) -> str | None:
        """Why the gang broke (None while it works)."""
        return self._broken

    # -- collectives ----------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], Any]) -> Any:
        if self._broken is not None:
            raise GangBroken(self._broken)
        try:
            return fn()
        except GangBroken:
            raise
        except Exception as exc:  # gloo / NCCL errors: a rank died, hung, or the group is gone
            self._broken = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            raise GangBroken(self._broken) from exc

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.spec.backend == "nccl" else t.cpu()

    def broadcast_object(self, obj: Any) -> Any:
        """``obj`` of rank 0 on every rank (small: headers, settings)."""
        box = [obj]
        self._guard(
            lambda: dist.broadcast_object_list(box, src=0, device=self.device if self.spec.backend == "nccl" else None)
        )
        return box[0]

    def broadcast_tensor(self, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's tensor ``t`` (shape and dtype known to every rank) on every rank."""
        buf = (
            self._dev(t.contiguous())
            if self.rank == 0 and t is not None
            else torch.empty(shape, dtype=dtype, device=self.device if self.spec.backend == "nccl" else "cpu")
        )
        self._guard(lambda: dist.broadcast(buf, src=0))
        return buf

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over the gang; ``op`` "sum" or "max"."""
        red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        buf = self._dev(t)
        self._guard(lambda: dist.all_reduce(buf, op=red))
        if buf is not t:
            t.copy_(buf.to(t.device))
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world_size, *t.shape): every rank's ``t``, in rank order."""
        buf = self._dev(t.contiguous())
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._guard(lambda: dist.all_gather(out, buf))
        return torch.stack(out).to(t.device)

    def agree_or_raise(self, refusal: ValueError | None) -> None:
        """Return when no rank refused the batch (one small all-reduce); else raise, on every
        rank, a ValueError with the first refusing rank's message."""
        flag = torch.tensor([_OK if refusal is None else _REFUSED], dtype=torch.int64)
        self.all_reduce(flag, "max")
        if int(flag[0]) == _OK:
            return
        messages: list[str | None] = [None] * self.world_size
        self._guard(lambda: dist.all_gather_object(messages, None if refusal is None else str(refusal)))
        raise ValueError(next(m for m in messages if m is not None))
