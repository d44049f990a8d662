"""The committed protobuf/gRPC code must be what scripts/generate_protos.py makes now."""

import importlib.util
import sys

from conftest import ROOT


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = generator.generate(tmp_path)
    assert written, "no .proto files found"
    stale = []
    for fresh in written:
        committed = ROOT / fresh.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(committed.relative_to(ROOT)))
    assert not stale, f"stale generated code, run `{sys.executable} scripts/generate_protos.py`: {stale}"
