"""Fixtures of the SDK tests: a real server (serve_in_thread) over a small labelled data set."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers module next to this file

from sdk_support import Data, make_data, make_store, settings

from floworacle_server.service.testing import RunningServer, serve_in_thread


@pytest.fixture(scope="session")
def data() -> Data:
    return make_data()


@pytest.fixture(scope="session")
def server(data: Data) -> Iterator[RunningServer]:
    with serve_in_thread(settings(), make_store(data)) as srv:
        yield srv
