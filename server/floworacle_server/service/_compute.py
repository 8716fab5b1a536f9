"""Batch runners: merge validated jobs into one engine call, run it, and split the result back into
one wire response per job. They run on the batcher's worker thread, so tensor conversion and
response encoding stay off the event loop too.

Conversions are done in numpy, each MB-sized buffer is made once: torch's intra-op thread pool
was measured an order of magnitude slower than numpy for a 3 MB dtype conversion on a busy
2-core CPU, and every fresh buffer costs page faults.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from floworacle import _codec
from floworacle._wire import Outgoing
from floworacle.paths import PathCoefficients
from floworacle.v1 import oracle_pb2 as pb
from floworacle_server.engine import OracleQuery, Precision
from floworacle_server.service._requests import NearestJob, OracleJob

__all__ = ["OracleRunner", "NearestRunner"]

# The runner hands the engine read-only views of received messages (see _queries); torch warns
# about those once, though the engine never writes to its input.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

_PRECISION_ENUM = {Precision.EXACT: pb.PRECISION_EXACT, Precision.FAST: pb.PRECISION_FAST}
_VECTOR_OUTPUTS = ("velocity", "x1_hat", "eps_hat", "score")


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    # One copy in the promoted dtype (float16 + float32 -> float32, both exact); the copy is
    # also what makes the (read-only) wire buffers safe to hand to torch.
    if len(arrays) == 1:
        return np.array(arrays[0], copy=True)
    return np.concatenate(arrays, axis=0)


def _queries(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The merged (B, D) queries for the engine, in one pass over the wire data.

    The engine computes in float64 and screens float32 queries as they are. For data on the CPU,
    float32 queries of a single job go to the engine as the view of the received message they
    are (read-only; the engine makes its own float64 copy and never writes to its input), others
    are converted here, exactly, in numpy; for a GPU they keep their wire dtype so fewer bytes
    cross to the device, and the engine converts there.
    """
    if device.type == "cpu":
        if len(arrays) == 1:
            if arrays[0].dtype == np.float32:
                return torch.from_numpy(arrays[0])
            return torch.from_numpy(arrays[0].astype(np.float64))  # a copy: the wire buffer is read-only
        return torch.from_numpy(np.concatenate(arrays, axis=0, dtype=np.float64))
    return torch.from_numpy(_cat(arrays))


def _put(packed: Outgoing, field: str, value: torch.Tensor, dtype: str) -> None:
    """Answer tensor ``field`` of ``packed`` by reference (the (rows, D) outputs, and top-k or
    nearest columns up to 1,024 wide, are MB-sized)."""
    wd, shape, arr = _codec.encode_array(value.detach().cpu(), dtype)
    packed.put(field, wd.enum, shape, arr)


class OracleRunner:
    """Runs merged :class:`OracleJob` batches (all with the same batcher key) through the engine.

    Jobs may differ in outputs (the union is computed), top_k (the largest; each job keeps its
    first k, which are sorted by weight), labels (rows without labels are unconditional, -1),
    path and dtypes.
    """

    def __init__(self, chunk_rows: int | None = None, screen: str = "float32") -> None:
        self.chunk_rows = chunk_rows
        self.screen = screen
        #: Seconds of the last engine call alone (without merging and response encoding); the
        #: end-to-end benchmark splits a call's time into compute and transport with it.
        self.last_engine_seconds = 0.0

    def __call__(self, jobs: Sequence[OracleJob]) -> tuple[list[Outgoing], int]:
        from floworacle_server.engine import oracle

        ds = jobs[0].dataset
        x = _queries([j.x for j in jobs], ds.device)
        coeffs = PathCoefficients(
            *(np.concatenate([getattr(j.coeffs, f) for j in jobs]) for f in ("alpha", "sigma", "d_alpha", "d_sigma"))
        )
        t = None
        if all(j.t is not None for j in jobs):
            t = torch.from_numpy(np.concatenate([j.t for j in jobs if j.t is not None]))
        labels = None
        if any(j.labels is not None for j in jobs):
            labels = torch.from_numpy(
                np.concatenate([j.labels if j.labels is not None else np.full(j.rows, -1, np.int64) for j in jobs])
            )
        outputs = tuple(dict.fromkeys(o for j in jobs for o in j.outputs))
        query = OracleQuery(
            x_t=x,
            coeffs=coeffs,
            t=t,
            labels=labels,
            guidance=jobs[0].guidance,
            outputs=outputs,
            top_k=max(j.top_k for j in jobs),
            precision=jobs[0].precision,
        )
        start_engine = time.perf_counter()
        res = oracle(ds, query, chunk_rows=self.chunk_rows, screen=self.screen)
        self.last_engine_seconds = time.perf_counter() - start_engine
        out: list[Outgoing] = []
        start = 0
        for job in jobs:
            sl = slice(start, start + job.rows)
            start += job.rows
            resp = pb.OracleResponse(
                dataset=ds.name,
                fingerprint=ds.fingerprint,
                precision=_PRECISION_ENUM[job.precision],
                request_id=job.request_id,
            )
            packed = Outgoing(resp)
            for name in _VECTOR_OUTPUTS:
                value = getattr(res, name)
                if name in job.outputs and value is not None:
                    # one conversion to the wire dtype here, one copy into the message when
                    # gRPC serializes it
                    _put(packed, name, value[sl].reshape(job.rows, *job.out_shape), job.out_dtype)
            if "topk" in job.outputs and res.topk_indices is not None and res.topk_weights is not None:
                _put(packed, "topk_indices", res.topk_indices[sl, : job.top_k], "int64")
                _put(packed, "topk_weights", res.topk_weights[sl, : job.top_k], "float64")
            for name in ("entropy", "ess"):
                value = getattr(res, name)
                if name in job.outputs and value is not None:
                    _codec.fill(getattr(resp, name), value[sl].cpu(), "float64")
            for name in ("x1_hat_error_bound", "velocity_error_bound"):
                value = getattr(res, name)
                if value is not None:
                    _codec.fill(getattr(resp, name), value[sl].cpu(), "float64")
            out.append(packed)
        return out, int(res.refined)


class NearestRunner:
    """Runs merged :class:`NearestJob` batches (same data set) with the largest k; each job keeps
    its own first k columns (nearest first)."""

    def __call__(self, jobs: Sequence[NearestJob]) -> tuple[list[Outgoing], int]:
        from floworacle_server.engine import nearest

        ds = jobs[0].dataset
        # A job's points are its own writable float64 array already (parse_nearest made them).
        x = torch.from_numpy(jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs], axis=0))
        k = max(j.k for j in jobs)
        res = nearest(ds, x, k)
        out: list[Outgoing] = []
        start = 0
        for job in jobs:
            sl = slice(start, start + job.rows)
            start += job.rows
            packed = Outgoing(pb.NearestResponse(dataset=ds.name, fingerprint=ds.fingerprint))
            _put(packed, "indices", res.indices[sl, : job.k], "int64")
            _put(packed, "distances", res.distances[sl, : job.k], "float64")
            if res.labels is not None:
                _put(packed, "labels", res.labels[sl, : job.k], "int64")
            out.append(packed)
        return out, 0
