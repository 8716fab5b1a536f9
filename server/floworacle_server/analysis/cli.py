"""Command-line entry of the analysis area (placeholder until the area lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this area's subcommands to the floworacle parser."""
    del sub


def _unused(args: argparse.Namespace) -> int:
    return 0
