"""Regenerate the protobuf / gRPC modules of the SDK from proto/ (never edit them by hand).

Usage: python scripts/gen_proto.py [OUTPUT_ROOT]   (default: client/)
The test tests/client/test_proto_generated.py runs this into a temporary folder and compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ["floworacle/v1/oracle.proto"]


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "floworacle" / "v1" / "__init__.py").write_text('"""Generated from proto/floworacle/v1 (do not edit)."""\n')


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=ROOT / "client", help="output root (default: client/)")
    generate(ap.parse_args().out)
