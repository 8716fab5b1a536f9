"""Batch runners: merge validated jobs into one engine call, run it, and split the result back into
one wire response per job. They run on the batcher's worker thread, so tensor conversion and
response encoding stay off the event loop too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from floworacle import _codec
from floworacle.paths import PathCoefficients
from floworacle.v1 import oracle_pb2 as pb
from floworacle_server.engine import OracleQuery, Precision
from floworacle_server.service._requests import NearestJob, OracleJob

__all__ = ["OracleRunner", "NearestRunner"]

_PRECISION_ENUM = {Precision.EXACT: pb.PRECISION_EXACT, Precision.FAST: pb.PRECISION_FAST}
_VECTOR_OUTPUTS = ("velocity", "x1_hat", "eps_hat", "score")


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    # One copy in the promoted dtype (float16 + float32 -> float32, both exact); the copy is
    # also what makes the (read-only) wire buffers safe to hand to torch.
    if len(arrays) == 1:
        return np.array(arrays[0], copy=True)
    return np.concatenate(arrays, axis=0)


class OracleRunner:
    """Runs merged :class:`OracleJob` batches (all with the same batcher key) through the engine.

    Jobs may differ in outputs (the union is computed), top_k (the largest; each job keeps its
    first k, which are sorted by weight), labels (rows without labels are unconditional, -1),
    path and dtypes.
    """

    def __init__(self, chunk_rows: int | None = None) -> None:
        self.chunk_rows = chunk_rows

    def __call__(self, jobs: Sequence[OracleJob]) -> tuple[list[pb.OracleResponse], int]:
        from floworacle_server.engine import oracle

        ds = jobs[0].dataset
        x = torch.from_numpy(_cat([j.x for j in jobs]))
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
        res = oracle(ds, query, chunk_rows=self.chunk_rows)
        out: list[pb.OracleResponse] = []
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
            for name in _VECTOR_OUTPUTS:
                value = getattr(res, name)
                if name in job.outputs and value is not None:
                    block = value[sl].detach().cpu().reshape(job.rows, *job.out_shape)
                    getattr(resp, name).CopyFrom(_codec.encode(block, job.out_dtype))
            if "topk" in job.outputs and res.topk_indices is not None and res.topk_weights is not None:
                resp.topk_indices.CopyFrom(_codec.encode(res.topk_indices[sl, : job.top_k].cpu(), "int64"))
                resp.topk_weights.CopyFrom(_codec.encode(res.topk_weights[sl, : job.top_k].cpu(), "float64"))
            for name in ("entropy", "ess"):
                value = getattr(res, name)
                if name in job.outputs and value is not None:
                    getattr(resp, name).CopyFrom(_codec.encode(value[sl].cpu(), "float64"))
            for name in ("x1_hat_error_bound", "velocity_error_bound"):
                value = getattr(res, name)
                if value is not None:
                    getattr(resp, name).CopyFrom(_codec.encode(value[sl].cpu(), "float64"))
            out.append(resp)
        return out, int(res.refined)


class NearestRunner:
    """Runs merged :class:`NearestJob` batches (same data set) with the largest k; each job keeps
    its own first k columns (nearest first)."""

    def __call__(self, jobs: Sequence[NearestJob]) -> tuple[list[pb.NearestResponse], int]:
        from floworacle_server.engine import nearest

        ds = jobs[0].dataset
        x = torch.from_numpy(_cat([j.x for j in jobs]))
        k = max(j.k for j in jobs)
        res = nearest(ds, x, k)
        out: list[pb.NearestResponse] = []
        start = 0
        for job in jobs:
            sl = slice(start, start + job.rows)
            start += job.rows
            resp = pb.NearestResponse(dataset=ds.name, fingerprint=ds.fingerprint)
            resp.indices.CopyFrom(_codec.encode(res.indices[sl, : job.k].cpu(), "int64"))
            resp.distances.CopyFrom(_codec.encode(res.distances[sl, : job.k].cpu(), "float64"))
            if res.labels is not None:
                resp.labels.CopyFrom(_codec.encode(res.labels[sl, : job.k].cpu(), "int64"))
            out.append(resp)
        return out, 0
