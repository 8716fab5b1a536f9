"""Shared test set-up: makes the independent float64 reference (tests/oracle_reference.py) importable,
and sends every message of the suite through the zero-copy framing (floworacle._wire) however small:
the suite's small data sets would otherwise stay below its size threshold and never reach it
(tests/client/test_wire.py also covers the production threshold)."""

import sys
from pathlib import Path

from floworacle import _wire

sys.path.insert(0, str(Path(__file__).resolve().parent))
_wire.SCAN_MIN_BYTES = 0
