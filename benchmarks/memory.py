"""Memory benchmark: what large and thin canvases inside the pixel limit cost the server.

    python benchmarks/memory.py [--concurrent 8] [--rounds 3]

One server (lymphoblast, default settings, no audit). Its RSS is sampled every 50 ms while
`--concurrent` callers send, in turn: ordinary cells (the baseline), 1000 x 25000 px PNGs,
25000 x 1000 px PNGs and 5000 x 5000 px PNGs (each 25 Mpx, the default pixel limit, one small
cell in a corner). Printed: the peak RSS above the server's idle RSS for each, and the time
per image; the target is at most 0.5 GB above idle for any image within the limits.
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

from dxserve_client import Client  # noqa: E402


def canvas(width: int, height: int, cell: bytes) -> bytes:
    rgb = np.zeros((height, width, 3), np.uint8)
    small = np.asarray(Image.open(io.BytesIO(cell)).convert("RGB"))
    h, w = min(small.shape[0], height), min(small.shape[1], width)
    rgb[:h, :w] = small[:h, :w]
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=50096)
    args = parser.parse_args()
    cells = sample_images(args.concurrent)
    cases = {"ordinary cells (baseline)": cells, **{f"{w} x {h} px PNG": [canvas(w, h, cells[0])] * args.concurrent
                                                  for w, h in ((1000, 25000), (25000, 1000), (5000, 5000))}}
    server = start_server(args.port)
    try:
        with Client(f"127.0.0.1:{args.port}", timeout_s=300) as client:
            idle = rss_mb(server.pid)
            print(f"server RSS idle: {idle:.0f} MB; {args.concurrent} concurrent callers x {args.rounds} rounds each")
            for name, images in cases.items():
                def work(images=images) -> float:
                    return concurrently(args.concurrent, lambda k: [client.classify(images[k]) for _ in range(args.rounds)])

                peak, seconds = peak_while(server.pid, work)
                print(f"  {name:28s}: peak {peak - idle:+6.0f} MB over idle, {seconds / args.rounds:.2f} s a round, "
                      f"RSS after {rss_mb(server.pid) - idle:+.0f} MB")
    finally:
        server.send_signal(15)
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
