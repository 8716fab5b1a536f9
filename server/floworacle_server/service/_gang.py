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
2. exact batches, after the screening GEMM: all-reduce (max) of the slots' screening lower
   bounds, so every shard keeps the candidates within reach of the whole set's largest weight
   (a shard that does not hold a query's nearest samples then refines none, as one process would);
3. the partials' merge (the engine's :class:`~floworacle_server.engine.CollectiveMerge` over this
   gang's collectives): all-reduce (max) of the running
   maxima and the logit-error bounds, each rank rescales its sums to them, all-reduce (sum) of
   the sums and of the variance's between terms, one all-gather of the top-k (indices already in
   the data set's original order) and a top-k of the union;
4. nearest queries: each rank's exact top-k of its shard, all-gathered and merged by the engine's
   own rule (:func:`~floworacle_server.engine.merge_nearest`: by ranking key, ties by index).

A batch travels as the protocol's query, field by field from its own definition
(:func:`floworacle.protocol.to_parts`): its plain values in one object, each array as bytes.

A rank that dies makes the next collective fail at once (gloo: connection closed), one that hangs
after ``gang_timeout_s``: rank 0 answers the batch with UNAVAILABLE (never a partial answer),
turns health NOT_SERVING and exits non-zero so the orchestrator restarts the group. SIGTERM to
rank 0 drains its in-flight work and then stops every rank; the other ranks ignore SIGTERM and
keep computing until rank 0 stops them (launchers signal every rank of a group at once).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from floworacle.protocol import NearestQuery, OracleQuery, from_parts, to_parts
from floworacle_server.data import Dataset, DatasetStore, DataStats
from floworacle_server.engine import (
    CollectiveMerge,
    NearestResult,
    OracleResult,
    merge_nearest,
    oracle,
    ranking_keys,
    search,
)

__all__ = ["GangSpec", "Gang", "GangBroken"]

log = logging.getLogger(__name__)

#: Status codes of the agreement round (a rank's outcome for one batch, max over the gang).
_OK, _REFUSED = 0, 1


class _NoLock(contextlib.nullcontext):  # type: ignore[type-arg]
    """The other ranks' stand-in for rank 0's command lock."""


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
        #: rank 0 sends each command and runs its collectives under this lock (the engine thread
        #: and the heartbeat take turns; every rank sees the same order)
        self.lock = threading.Lock()
        self._broken: str | None = None
        self._last = 0.0
        self._beat: threading.Thread | None = None
        self._beating = threading.Event()

    # -- membership ---------------------------------------------------------------------------
    def join(self) -> None:
        """Join the process group (blocks until every rank has joined or the timeout passes)."""
        s = self.spec
        log.info(
            "joining a gang of %d as rank %d (pid %d, %s, %s)",
            s.world_size,
            s.rank,
            os.getpid(),
            s.backend,
            s.init_method,
        )
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

    # -- start-up -------------------------------------------------------------------------------
    def complete_facts(self, store: DatasetStore) -> None:
        """Every rank loaded only its shard: merge the shards' facts into the whole set's (the
        extremes with max, the weighted rows per class with sum), and check that every rank holds
        the same data sets with the same fingerprints."""
        names = [(ds.name, ds.fingerprint, ds.total_samples) for ds in store]
        every: list[Any] = [None] * self.world_size
        self._guard(lambda: dist.all_gather_object(every, names))
        if any(e != names for e in every):
            raise ValueError(
                f"the gang's ranks hold different data sets: {every}; start every rank with the same --data"
            )
        for ds in store:
            assert ds.shard is not None, "a gang's data sets are shards"
            mine = ds.stats
            maxima, alive = mine.packed()
            self.all_reduce(mx := torch.from_numpy(maxima), "max")
            self.all_reduce(al := torch.from_numpy(alive), "sum")
            resident = torch.tensor([ds.resident_bytes], dtype=torch.int64)
            self.all_reduce(resident, "sum")
            ds.set_stats(DataStats.from_packed(mine.num_samples, mine.class_counts, mx.numpy(), al.numpy()))
            ds.shard.resident_bytes = int(resident[0])

    # -- one batch, on every rank -------------------------------------------------------------------
    def oracle(self, ds: Dataset, query: OracleQuery, chunk_rows: int | None, screen: str) -> OracleResult:
        """Rank 0: send the batch to the other ranks and compute this shard's part; every rank
        ends with the whole set's answer (ValueError: a refusal the gang agreed on)."""
        with self._turn():
            if self.rank == 0:
                self._send("oracle", ds.name, query)
            return oracle(ds, query, chunk_rows=chunk_rows, screen=screen, merge=CollectiveMerge(self))

    def _turn(self) -> Any:
        """Rank 0's hold on the gang for one command (others: nothing to hold)."""
        self._last = time.monotonic()
        return self.lock if self.rank == 0 else _NoLock()

    # -- liveness -----------------------------------------------------------------------------------
    def start_heartbeat(self, on_broken: Callable[[str], None]) -> None:
        """Rank 0: while the gang is idle, a ping every quarter of the timeout, so a rank that
        died is noticed (health NOT_SERVING) without waiting for a request, and the other ranks'
        wait for the next command never runs into the collective timeout."""
        period = max(0.2, self.spec.timeout_s / 4)

        def beat() -> None:
            while not self._beating.wait(period / 2):
                if time.monotonic() - self._last < period:
                    continue
                with self._turn():
                    try:
                        self.broadcast_object({"op": "ping"})
                        self.agree_or_raise(None)
                    except GangBroken as exc:
                        on_broken(str(exc))
                        return

        self._beat = threading.Thread(target=beat, name="floworacle-gang-heartbeat", daemon=True)
        self._beat.start()

    def stop_heartbeat(self) -> None:
        self._beating.set()
        if self._beat is not None:
            self._beat.join(timeout=self.spec.timeout_s)

    def nearest(self, ds: Dataset, query: NearestQuery) -> NearestResult:
        """Rank 0: send the search; every rank: its shard's k nearest, then the gang's k nearest of
        those (gathered, merged by the search's own ranking, ties by index)."""
        with self._turn():
            if self.rank == 0:
                self._send("nearest", ds.name, query)
            return self._nearest(ds, query)

    def _nearest(self, ds: Dataset, q: NearestQuery) -> NearestResult:
        k = q.k
        kk = min(k, ds.num_samples - (1 if q.exclude is not None else 0))
        refusal: ValueError | None = None
        res = None
        try:
            if kk < 1:
                raise ValueError("no rows")  # pragma: no cover - shards hold >= 2 rows each
            if q.exclude is not None and k > ds.total_samples - self.world_size:
                # each shard leaves one row out of its own search, so W rows may be missing at worst
                raise ValueError(
                    f"k = {k} with exclude is more than a gang of {self.world_size} shards can answer: "
                    f"k must be at most N - {self.world_size} = {ds.total_samples - self.world_size} here"
                )
            res = search(ds, replace(q, k=kk))
        except ValueError as exc:
            refusal = exc
        self.agree_or_raise(refusal)
        assert res is not None
        b, pad = q.rows, k - kk

        def padded(t: torch.Tensor, fill: float) -> torch.Tensor:
            t = t.to(torch.float64)
            return torch.cat([t, t.new_full((b, pad), fill)], dim=1) if pad else t

        cols = [padded(ranking_keys(ds, q, res), math.inf), padded(res.distances, math.inf), padded(res.indices, -1)]
        if res.labels is not None:
            cols.append(padded(res.labels, -1))
        if res.similarities is not None:
            cols.append(padded(res.similarities, -math.inf))
        every = self.all_gather(torch.stack(cols))  # (W, c, B, k); indices < 2^53 are exact in float64
        parts = []
        for w in range(self.world_size):
            c = every[w]
            labels = c[3].to(torch.int64) if res.labels is not None else None
            sims = c[3 + (res.labels is not None)] if res.similarities is not None else None
            part = NearestResult(c[2].to(torch.int64), c[1], labels, bool(res.approximate), sims)
            parts.append((c[0], part))
        return merge_nearest(parts, k)

    # -- commands from rank 0 ----------------------------------------------------------------------
    def _send(self, op: str, name: str, query: OracleQuery | NearestQuery) -> None:
        """Broadcast a command with its query: the query's plain values in one object, then each of
        its arrays as bytes (shapes and dtypes travel with the values)."""
        meta, arrays = to_parts(query)
        self.broadcast_object({"op": op, "dataset": name, "query": meta})
        for key in sorted(arrays):
            raw = torch.from_numpy(np.ascontiguousarray(arrays[key]).reshape(-1).view(np.uint8))
            self.broadcast_tensor(raw, tuple(raw.shape), torch.uint8)

    def _receive(self, h: dict[str, Any]) -> OracleQuery | NearestQuery:
        """The query of rank 0's command ``h``."""
        meta = h["query"]
        arrays: dict[str, np.ndarray] = {}
        for key in sorted(meta["arrays"]):
            shape, dtype = meta["arrays"][key]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            raw = self.broadcast_tensor(None, (nbytes,), torch.uint8).cpu().numpy()
            arrays[key] = raw.view(np.dtype(dtype)).reshape(shape)
        return from_parts(meta, arrays)

    def stop_workers(self) -> None:
        """Rank 0: tell the other ranks to leave (after the drain)."""
        self.stop_heartbeat()
        if self._broken is None:
            with self._turn():
                try:
                    self.broadcast_object({"op": "stop"})
                except GangBroken:
                    log.warning("could not reach every rank to stop it: %s", self._broken)

    def serve_commands(self, store: DatasetStore, chunk_rows: int | None, screen: str) -> None:
        """The other ranks' loop: compute every batch rank 0 sends, until it says stop. Raises
        :class:`GangBroken` when the gang breaks."""
        with torch.no_grad():
            while True:
                h = self.broadcast_object(None)
                if h["op"] == "stop":
                    log.info("rank 0 stopped the gang")
                    return
                if h["op"] == "ping":
                    self.agree_or_raise(None)
                    continue
                ds = store.get(h["dataset"])
                if h["op"] not in ("oracle", "nearest"):
                    raise GangBroken(f"unknown gang command {h['op']!r}")
                query = self._receive(h)
                try:
                    if isinstance(query, OracleQuery):
                        self.oracle(ds, query, chunk_rows, screen)
                    else:
                        self.nearest(ds, query)
                except ValueError:
                    pass  # refused by the whole gang alike; rank 0 answers the caller
