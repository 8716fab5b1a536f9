"""Fixtures of the service tests: one real server (digits plus two small synthetic data sets) on a
free port, reached over a real channel with the raw generated stub."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.data import Dataset, DatasetStore, load_digits
from floworacle_server.data._digits import digits_arrays
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings

# --import-mode=importlib puts no test folder on sys.path; the helpers module lives beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits in the caller's (original) order: (1797, 64) float32 and (1797,) labels."""
    return digits_arrays()


@pytest.fixture(scope="session")
def shaped_arrays() -> tuple[np.ndarray, np.ndarray]:
    """A small labelled data set with a multi-dimensional sample shape (2, 4, 4)."""
    rng = np.random.default_rng(7)
    return rng.standard_normal((48, 2, 4, 4)).astype(np.float32), rng.integers(0, 3, size=48)


@pytest.fixture(scope="session")
def plain_arrays() -> np.ndarray:
    """A small data set without labels, D = 8."""
    return np.random.default_rng(8).standard_normal((30, 8)).astype(np.float32)


def make_store(shaped: tuple[np.ndarray, np.ndarray], plain: np.ndarray) -> DatasetStore:
    store = DatasetStore()
    store.add(load_digits("cpu"))
    store.add(Dataset.from_arrays("shaped", shaped[0], shaped[1], sample_shape=(2, 4, 4)))
    store.add(Dataset.from_arrays("plain", plain))
    return store


@pytest.fixture(scope="module")
def server(shaped_arrays: tuple[np.ndarray, np.ndarray], plain_arrays: np.ndarray) -> Iterator[RunningServer]:
    settings = Settings(device="cpu", max_request_rows=300, max_queue_delay_ms=1.0)
    with serve_in_thread(settings, make_store(shaped_arrays, plain_arrays)) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.FlowOracleStub:
    return pb_grpc.FlowOracleStub(channel)
