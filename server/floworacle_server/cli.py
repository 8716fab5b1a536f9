"""The ``floworacle`` command: ``serve``, ``index build`` and ``analyze`` subcommands.

Each area registers its own subcommand (``register(subparsers)``) so this file stays a dispatcher.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from floworacle_server.analysis import cli as analysis_cli
    from floworacle_server.data import cli as data_cli
    from floworacle_server.service import cli as service_cli

    parser = argparse.ArgumentParser(prog="floworacle", description="Exact flow-matching oracle service and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    service_cli.register(sub)
    data_cli.register(sub)
    analysis_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
