"""Batch runners: one engine call for the queries the batcher merged, and one wire answer per query.

They run on the batcher's worker thread, so the merge of the queries (:meth:`OracleQuery.concat`)
and the encoding of the answers (:meth:`OracleQuery.response`) stay off the event loop too. The
queries reach the engine as they are: a single request's points as a view of the bytes protobuf
received (the engine makes the float64 copy it needs), merged requests' points in one
concatenation.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

from floworacle.protocol import NearestQuery, OracleQuery, pb
from floworacle_server.engine import oracle, search
from floworacle_server.service._gang import Gang
from floworacle_server.service._requests import Work

__all__ = ["OracleRunner", "NearestRunner"]

# The runner hands the engine read-only views of received messages; torch warns about those once,
# though the engine never writes to its input.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class OracleRunner:
    """Runs merged oracle queries (all with the same batcher key) through the engine.

    Queries may differ in outputs (the union is computed), top_k (the largest; each query keeps its
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

    def __call__(self, works: Sequence[Work[OracleQuery]]) -> tuple[list[pb.OracleResponse | Exception], int]:
        ds = works[0].dataset
        queries = [w.query for w in works]
        merged = OracleQuery.concat(queries)
        start_engine = time.perf_counter()
        if self.gang is not None:
            res = self.gang.oracle(ds, merged, self.chunk_rows, self.screen)
        else:
            res = oracle(ds, merged, chunk_rows=self.chunk_rows, screen=self.screen)
        self.last_engine_seconds = time.perf_counter() - start_engine
        out: list[pb.OracleResponse | Exception] = []
        start = 0
        for w in works:
            try:
                out.append(w.query.response(res, start, into=w.into))
            except ValueError as exc:  # an answer that cannot be sent (not finite): this request's alone
                out.append(exc)
            start += w.rows
        return out, int(res.refined)


class NearestRunner:
    """Runs merged nearest queries (same data set and search mode) with the largest k; each query
    keeps its own first k columns (nearest first)."""

    def __init__(self, gang: Gang | None = None) -> None:
        self.gang = gang

    def __call__(self, works: Sequence[Work[NearestQuery]]) -> tuple[list[pb.NearestResponse | Exception], int]:
        ds = works[0].dataset
        queries = [w.query for w in works]
        merged = NearestQuery.concat(queries)
        res = self.gang.nearest(ds, merged) if self.gang is not None else search(ds, merged)
        out: list[pb.NearestResponse | Exception] = []
        start = 0
        for q in queries:
            try:
                out.append(q.response(res, start))
            except ValueError as exc:  # distances that overflow float64: this request's alone
                out.append(exc)
            start += q.rows
        return out, 0
