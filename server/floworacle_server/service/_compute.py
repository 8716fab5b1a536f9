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

from floworacle.paths import PathCoefficients
from floworacle.protocol import BOUND_FIELDS, OUTPUTS, PRECISIONS, fill, pb
from floworacle_server.data import Dataset
from floworacle_server.engine import NearestResult, OracleQuery, OracleResult
from floworacle_server.service._gang import Gang
from floworacle_server.service._requests import NearestJob, OracleJob

__all__ = ["OracleRunner", "NearestRunner", "empty_oracle_response", "empty_nearest_response"]

# The runner hands the engine read-only views of received messages (see _queries); torch warns
# about those once, though the engine never writes to its input.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _queries(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The merged (B, D) queries for the engine, in one pass over the wire data.

    The engine computes in float64 and screens float32 queries as they are. For data on the CPU,
    float32 queries of a single job go to the engine as the array protobuf's bytes hold (read-only;
    the engine makes its own float64 copy and never writes to its input), others are converted
    here, exactly, in numpy; for a GPU they keep their wire dtype so fewer bytes cross to the
    device, and the engine converts there.
    """
    if device.type == "cpu":
        if len(arrays) == 1:
            if arrays[0].dtype == np.float32:
                return torch.from_numpy(arrays[0])
            return torch.from_numpy(arrays[0].astype(np.float64))  # a copy: the wire buffer is read-only
        return torch.from_numpy(np.concatenate(arrays, axis=0, dtype=np.float64))
    if len(arrays) == 1:
        return torch.from_numpy(np.array(arrays[0], copy=True))  # writable, in its wire dtype
    return torch.from_numpy(np.concatenate(arrays, axis=0))  # the promoted dtype (exact)


def _vector(jobs: Sequence[OracleJob | NearestJob], name: str, fill_value: int) -> torch.Tensor | None:
    """The jobs' (B,) int64 vectors ``name`` merged, ``fill_value`` for jobs without one; None if none has it."""
    parts: list[np.ndarray | None] = [getattr(j, name) for j in jobs]
    if all(p is None for p in parts):
        return None
    filled = [p if p is not None else np.full(j.rows, fill_value, np.int64) for p, j in zip(parts, jobs, strict=True)]
    return torch.from_numpy(np.concatenate(filled))


def _response(job: OracleJob, res: OracleResult, sl: slice) -> pb.OracleResponse:
    """The answer of ``job`` from rows ``sl`` of the merged result: each requested output, in its
    wire dtype, and the error bounds."""
    ds = job.dataset
    resp = pb.OracleResponse(
        dataset=ds.name,
        fingerprint=ds.fingerprint,
        precision=PRECISIONS[job.precision.value],  # type: ignore[arg-type]
        request_id=job.request_id,
    )
    for spec in job.outputs:
        for name in spec.fields:
            value = getattr(res, name)
            if value is None:
                raise RuntimeError(f"the engine did not compute the requested {name}")
            part = value[sl]
            if spec.kind == "sample":
                fill(getattr(resp, name), part.reshape(job.rows, *job.out_shape).detach().cpu(), job.out_dtype)
            elif spec.kind == "topk":
                fill(getattr(resp, name), part[:, : job.top_k].detach().cpu(), None)
            else:
                fill(getattr(resp, name), part.detach().cpu(), "float64")
    for name in BOUND_FIELDS:
        value = getattr(res, name)
        if value is not None:
            fill(getattr(resp, name), value[sl].detach().cpu(), "float64")
    return resp


def _empty_result(ds: Dataset, top_k: int) -> OracleResult:
    f64 = torch.float64
    vec = torch.zeros(0, dtype=f64)
    sample = torch.zeros(0, ds.dim, dtype=f64)
    return OracleResult(
        x1_hat=sample,
        velocity=sample,
        eps_hat=sample,
        score=sample,
        topk_indices=torch.zeros(0, top_k, dtype=torch.int64),
        topk_weights=torch.zeros(0, top_k, dtype=f64),
        entropy=vec,
        ess=vec,
        variance=vec,
        variance_error_bound=vec,
        x1_hat_error_bound=vec,
        velocity_error_bound=vec,
    )


def empty_oracle_response(job: OracleJob) -> pb.OracleResponse:
    """The answer to a batch of no queries: every requested output with 0 rows, in its shape."""
    return _response(job, _empty_result(job.dataset, job.top_k), slice(0, 0))


class OracleRunner:
    """Runs merged :class:`OracleJob` batches (all with the same batcher key) through the engine.

    Jobs may differ in outputs (the union is computed), top_k (the largest; each job keeps its
    first k, which are sorted by weight), labels (rows without labels are unconditional, -1),
    exclusions (rows without one exclude nothing, -1), path and dtypes.
    """

    def __init__(self, chunk_rows: int | None = None, screen: str = "float32", gang: Gang | None = None) -> None:
        self.chunk_rows = chunk_rows
        self.screen = screen
        #: a gang's rank 0: every batch goes to every rank and their partials are merged
        self.gang = gang
        #: Seconds of the last engine call alone (without merging and response encoding); the
        #: end-to-end benchmark splits a call's time into compute and transport with it.
        self.last_engine_seconds = 0.0

    def __call__(self, jobs: Sequence[OracleJob]) -> tuple[list[pb.OracleResponse], int]:
        from floworacle_server.engine import oracle

        ds = jobs[0].dataset
        x = _queries([j.x for j in jobs], ds.device)
        coeffs = PathCoefficients(
            *(np.concatenate([getattr(j.coeffs, f) for j in jobs]) for f in ("alpha", "sigma", "d_alpha", "d_sigma"))
        )
        t = None
        if all(j.t is not None for j in jobs):
            t = torch.from_numpy(np.concatenate([j.t for j in jobs if j.t is not None]))
        names = {n for j in jobs for n in j.output_names}
        query = OracleQuery(
            x_t=x,
            coeffs=coeffs,
            t=t,
            labels=_vector(jobs, "labels", -1),
            exclude=_vector(jobs, "exclude", -1),
            guidance=jobs[0].guidance,
            outputs=tuple(o.name for o in OUTPUTS if o.name in names),
            top_k=max(j.top_k for j in jobs),
            precision=jobs[0].precision,
        )
        start_engine = time.perf_counter()
        if self.gang is not None:
            res = self.gang.oracle(ds, query, self.chunk_rows, self.screen)
        else:
            res = oracle(ds, query, chunk_rows=self.chunk_rows, screen=self.screen)
        self.last_engine_seconds = time.perf_counter() - start_engine
        out: list[pb.OracleResponse] = []
        start = 0
        for job in jobs:
            out.append(_response(job, res, slice(start, start + job.rows)))
            start += job.rows
        return out, int(res.refined)


def _nearest_response(job: NearestJob, res: NearestResult, sl: slice) -> pb.NearestResponse:
    ds = job.dataset
    resp = pb.NearestResponse(dataset=ds.name, fingerprint=ds.fingerprint, approximate=bool(res.approximate))
    fill(resp.indices, res.indices[sl, : job.k].cpu(), "int64")
    fill(resp.distances, res.distances[sl, : job.k].cpu(), "float64")
    if res.labels is not None:
        fill(resp.labels, res.labels[sl, : job.k].cpu(), "int64")
    if res.similarities is not None:
        fill(resp.similarities, res.similarities[sl, : job.k].cpu(), "float64")
    return resp


def empty_nearest_response(job: NearestJob) -> pb.NearestResponse:
    """The answer to a batch of no points: (0, k) columns."""
    ds = job.dataset
    labels = torch.zeros(0, job.k, dtype=torch.int64) if ds.labels is not None else None
    res = NearestResult(
        indices=torch.zeros(0, job.k, dtype=torch.int64),
        distances=torch.zeros(0, job.k, dtype=torch.float64),
        labels=labels,
    )
    return _nearest_response(job, res, slice(0, 0))


class NearestRunner:
    """Runs merged :class:`NearestJob` batches (same data set and search mode) with the largest k;
    each job keeps its own first k columns (nearest first)."""

    def __init__(self, gang: Gang | None = None) -> None:
        self.gang = gang

    def __call__(self, jobs: Sequence[NearestJob]) -> tuple[list[pb.NearestResponse], int]:
        from floworacle_server.engine import nearest, posterior_nearest

        ds = jobs[0].dataset
        x = torch.from_numpy(np.concatenate([j.x for j in jobs], axis=0, dtype=np.float64))
        k = max(j.k for j in jobs)
        first = jobs[0]  # every job of the batch has the same search mode (it is in the key)
        exclude = _vector(jobs, "exclude", -1)
        nprobe = first.nprobe or None
        alpha = sigma = None
        if first.alpha is not None:
            alpha = torch.from_numpy(np.concatenate([j.alpha for j in jobs if j.alpha is not None]))
            sigma = torch.from_numpy(np.concatenate([j.sigma for j in jobs if j.sigma is not None]))
        if self.gang is not None:
            res = self.gang.nearest(
                ds, x, k, exact=first.exact, nprobe=nprobe, space=first.space, exclude=exclude, alpha=alpha, sigma=sigma
            )
        elif alpha is not None:
            res = posterior_nearest(ds, x, alpha, sigma, k=k, exclude=exclude, exact=first.exact, nprobe=nprobe)
        else:
            res = nearest(ds, x, k, space=first.space, exclude=exclude, exact=first.exact, nprobe=nprobe)
        out: list[pb.NearestResponse] = []
        start = 0
        for job in jobs:
            out.append(_nearest_response(job, res, slice(start, start + job.rows)))
            start += job.rows
        return out, 0
