"""Memory benchmark: what large and thin canvases inside the pixel limit cost the server.

    python benchmarks/memory.py [--concurrent 8] [--rounds 3]

One server (lymphoblast and smear-field, default settings, no audit). Its RSS is sampled every
50 ms while `--concurrent` callers send, in turn: ordinary cells (the baseline), 1000 x 25000
px PNGs, 25000 x 1000 px PNGs and 5000 x 5000 px PNGs to lymphoblast (each 25 Mpx, the
server's pixel limit, one small cell in a corner: above lymphoblast's own 4 Mpx, refused from
the header), and to smear-field a white 5000 x 5000 px PNG and a 5000 x 5000 px smear (BCCD
fields tiled, JPEG). Printed: the peak RSS above the server's idle RSS for each, the time per
image and how many were refused; the target is at most 0.5 GB above idle for any image within
the limits.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import concurrently, peak_while, rss_mb, sample_images, start_server  # noqa: E402

from dxserve_client import Client, DxServeError  # noqa: E402


def canvas(width: int, height: int, cell: bytes) -> bytes:
    rgb = np.zeros((height, width, 3), np.uint8)
    small = np.asarray(Image.open(io.BytesIO(cell)).convert("RGB"))
    h, w = min(small.shape[0], height), min(small.shape[1], width)
    rgb[:h, :w] = small[:h, :w]
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def smear(width: int, height: int) -> bytes:
    bccd = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd" / "JPEGImages"
    files = sorted(bccd.glob("*.jpg")) or sorted((Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fields").glob("*.jpg"))
    rows, cols = -(-height // 480), -(-width // 640)
    tiles = [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((640, 480))) for i in range(rows * cols)]
    field = np.vstack([np.hstack(tiles[r * cols:(r + 1) * cols]) for r in range(rows)])[:height, :width]
    out = io.BytesIO()
    Image.fromarray(field).save(out, format="JPEG", quality=90)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=50096)
    args = parser.parse_args()
    cells = sample_images(args.concurrent)
    cases = {"ordinary cells (baseline)": ("lymphoblast", cells),
             **{f"{w} x {h} px PNG": ("lymphoblast", [canvas(w, h, cells[0])] * args.concurrent)
                for w, h in ((1000, 25000), (25000, 1000), (5000, 5000))}}
    white = io.BytesIO()
    Image.new("RGB", (5000, 5000), "white").save(white, format="PNG")
    cases["smear-field: white 5000 x 5000 PNG"] = ("smear-field", [white.getvalue()] * args.concurrent)
    cases["smear-field: 5000 x 5000 smear JPEG"] = ("smear-field", [smear(5000, 5000)] * args.concurrent)
    server = start_server(args.port)
    try:
        with Client(f"127.0.0.1:{args.port}", timeout_s=300) as client:
            idle = rss_mb(server.pid)
            print(f"server RSS idle: {idle:.0f} MB; {args.concurrent} concurrent callers x {args.rounds} rounds each")
            for name, (plugin, images) in cases.items():
                refused = []

                def send(image: bytes, plugin: str = plugin) -> None:
                    try:
                        client.classify(image, plugin=plugin)
                    except DxServeError as error:
                        refused.append(error.reason)

                def work(images=images, send=send) -> float:
                    return concurrently(args.concurrent, lambda k: [send(images[k]) for _ in range(args.rounds)])

                peak, seconds = peak_while(server.pid, work)
                said = f", refused {len(refused)} ({', '.join(sorted(set(refused)))})" if refused else ""
                print(f"  {name:36s}: peak {peak - idle:+6.0f} MB over idle, {seconds / args.rounds:.2f} s a round, "
                      f"RSS after {rss_mb(server.pid) - idle:+.0f} MB{said}")
    finally:
        server.send_signal(15)
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
