"""A site version serves at its base version's speed (issue 33): both through one server, in turns.

    python benchmarks/sites.py [--images 512] [--streams 4] [--rounds 3]

A site version of the default lymphoblast version is onboarded (`dxserve site onboard`, as a
lab would) on the fixture cells made to look like another lab's (the cast tests/test_sites.py
uses: 48 labelled, 12 unlabelled), into a scratch `sites_dir` with acceptance criteria this tiny
site meets. One server then serves both; `--streams` concurrent ClassifyStreams of the same
images name the base version, then the site version, the order reversed each turn. Printed:
images/s of each per turn, and the ratio site / base (median of the turns, with its range);
the target is a ratio of about 1 (the site version runs the same graph with its own batch-norm
statistics, and a logistic head on its features).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import CELLS, concurrently, start_server  # noqa: E402

from dxserve_client import Client  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_sites import as_another_lab, relaxed, write_another_lab  # noqa: E402


def onboard(root: Path) -> tuple[Path, Path, str]:
    """(sites_dir, the operator's TOML, the site version): the fixture cells as another lab's."""
    from dxserve.cli import main as dxserve

    write_another_lab(root)
    config = relaxed(root)  # acceptance criteria this tiny site meets
    dxserve(["site", "onboard", "--plugin", "lymphoblast", "--site", "lab", "--labelled", str(root / "labels.csv"),
             "--unlabelled", str(root / "unlabelled"), "--sites-dir", str(root / "sites"), "--config", str(config)])
    (version,) = [d.name for d in (root / "sites" / "lymphoblast").iterdir()]
    return root / "sites", config, version


def images_of_the_lab(n: int) -> list[bytes]:
    base = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(CELLS.glob("*.png"))]
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(as_another_lab(base[i % len(base)], i // len(base) % 8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def streaming(address: str, images: list[bytes], streams: int, version: str) -> float:
    """images/s with `streams` concurrent ClassifyStreams of `images` naming `version` ("": the default)."""
    shares = [images[i::streams] for i in range(streams)]
    answered = [0] * streams

    def run(k: int) -> None:
        with Client(address) as client:
            answered[k] = sum(r.ok and r.model_version == (version or r.model_version)
                              for r in client.classify_stream(shares[k], model_version=version))

    seconds = concurrently(streams, run)
    assert sum(answered) == len(images), f"{sum(answered)} of {len(images)} answered by {version or 'the default'}"
    return len(images) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=50097)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sites_dir, config, version = onboard(Path(scratch))
        images = images_of_the_lab(args.images)
        server = start_server(args.port, "--sites-dir", str(sites_dir), "--config", str(config))
        address = f"127.0.0.1:{args.port}"
        try:
            for v in ("", version):  # warm both up
                streaming(address, images[:64], 2, v)
            ratios = []
            for turn in range(args.rounds):
                order = ("", version) if turn % 2 == 0 else (version, "")
                rates = {v: streaming(address, images, args.streams, v) for v in order}
                ratios.append(rates[version] / rates[""])
                print(f"turn {turn + 1}: base {rates['']:.1f} images/s, site version {version} {rates[version]:.1f} images/s")
        finally:
            server.terminate()
            server.wait(60)
    print(f"site / base throughput, {args.streams} streams, {args.images} images: {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; target about 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
