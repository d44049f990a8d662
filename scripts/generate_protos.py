"""Regenerate the code made from protos/: the Python protobuf/gRPC modules (with .pyi stubs)
in clients/python/dxserve/v1/ (the dxserve-client distribution, which the server
uses too), and the .proto files the Node.js client loads at run time
(clients/node/protos/: dxserve's own and the google.rpc ones it needs, from
googleapis-common-protos).

    python scripts/generate_protos.py            # write into the repository
    python scripts/generate_protos.py --out DIR  # write under DIR instead (the staleness test does)

The generated files are committed; tests/test_generated_code.py fails when they differ
from what this script makes from the current .proto files.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
NODE_PROTOS = Path("clients/node/protos")  # relative to the output root
GOOGLE_RPC = ("status.proto", "error_details.proto")  # what the Node.js client needs beside dxserve's


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(root: Path) -> list[Path]:
    """Python code under root/clients/python, Node.js protos under root/clients/node/protos; the files written."""
    written = generate_python(root / "clients" / "python")
    import google.rpc

    node = root / NODE_PROTOS
    copies = [(p, node / p.relative_to(PROTOS)) for p in proto_files() if p.parent.name == "v1" and "reflection" not in p.name]
    copies += [(Path(google.rpc.__path__[0]) / name, node / "google" / "rpc" / name) for name in GOOGLE_RPC]
    for source, target in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        written.append(target)
    return written


def generate_python(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto; return the files written."""
    import google.rpc  # googleapis-common-protos ships google/rpc/*.proto
    from grpc_tools import protoc

    googleapis = Path(google.rpc.__path__[0]).parent.parent
    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"-I{googleapis}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for source in sources:
        package_dir = out / Path(source).parent
        # dxserve/v1/ is a package; dxserve/ stays a namespace that the server distribution's
        # dxserve package shares (server/dxserve/__init__.py extends its path to find v1).
        (package_dir / "__init__.py").touch()
        stem = Path(source).stem
        written += [package_dir / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT)
    for path in generate(parser.parse_args().out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
