"""The query's points travel from the received bytes to the engine without a copy: protobuf's
parser hands out the bytes, the query views them, a one-request batch is the query itself, and
the engine's entry views them as a tensor (its float64 copy is the one it needs). 2-byte dtypes
are widened once, to float32, on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle import protocol
from floworacle.protocol import DatasetFacts, OracleQuery
from floworacle.v1 import oracle_pb2 as pb
from floworacle_server.engine._types import as_tensor

FACTS = DatasetFacts(name="d", num_samples=10, dim=8, sample_shape=(8,))


def _received(dtype: str) -> OracleQuery:
    x = np.random.default_rng(0).standard_normal((4, 8))
    req = pb.OracleRequest(x_t=protocol.encode(x, dtype), t=protocol.encode(np.full(4, 0.5)))
    parsed = pb.OracleRequest.FromString(req.SerializeToString())  # as the servicer parses it
    return OracleQuery.concat([OracleQuery.from_request(parsed, 1024).check(FACTS)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_points_reach_the_engine_as_a_view_of_the_received_bytes(dtype):
    q = _received(dtype)
    wire = q.x_t.data
    root = wire
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root, bytes)  # a view of the bytes protobuf handed out, no copy between
    t = as_tensor(q.x_t, torch.device("cpu"))
    assert t.dtype == getattr(torch, dtype) and t.data_ptr() == wire.ctypes.data


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_two_byte_points_are_widened_once(dtype):
    q = _received(dtype)
    t = as_tensor(q.x_t, torch.device("cpu"))
    assert t.dtype == torch.float32 and t.data_ptr() != q.x_t.data.ctypes.data
    assert torch.equal(t, torch.from_numpy(protocol.decode(protocol.encode(q.x_t.numpy(), dtype)).astype(np.float32)))
