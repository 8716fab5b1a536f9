"""Shared test set-up: makes the independent float64 reference (tests/oracle_reference.py) importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
