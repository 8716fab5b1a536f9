"""The data arguments every ``floworacle analyze`` command shares: ``--data FILE`` or ``--dataset
NAME`` (one of them), and the spec the loader takes from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_data_source", "data_spec"]

_FILE_HELP = "data file (.npy/.npz/.safetensors/.pt) or index directory"
_NAME_HELP = "a data set name ('digits' is embedded) or path"


def add_data_source(p: argparse.ArgumentParser, *, file_help: str = _FILE_HELP, name_help: str = _NAME_HELP) -> Any:
    """``--data`` and ``--dataset`` as a required either-or; returns the group (for more sources)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", help=file_help)
    g.add_argument("--dataset", help=name_help)
    return g


def data_spec(args: argparse.Namespace, file: str = "data", name: str = "dataset") -> str:
    """What to load: the file of ``--<file>`` (which must exist) or the name of ``--<name>``."""
    path, given = getattr(args, file), getattr(args, name)
    flag = f"--{file.replace('_', '-')}"
    if path is not None:
        if not Path(path).exists():
            raise ValueError(f"{flag} {path} does not exist")
        return str(path)
    if given is None:
        raise ValueError(f"give {flag} or --{name.replace('_', '-')}")
    return str(given)
