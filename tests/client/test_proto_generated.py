"""The committed protobuf / gRPC modules are exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = tmp_path / "floworacle" / "v1"
    committed = ROOT / "client" / "floworacle" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert {"oracle_pb2.py", "oracle_pb2.pyi", "oracle_pb2_grpc.py", "__init__.py"} <= set(names)
    assert sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")) == names
    for name in names:
        assert (committed / name).read_bytes() == (fresh / name).read_bytes(), (
            f"client/floworacle/v1/{name} differs from what proto/ generates; run python scripts/gen_proto.py"
        )
