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
import base64
import io
import json
import sys
import urllib.error
import urllib.request
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
    parser.add_argument("--repeat", type=int, default=40, help="bad requests of each kind, one after another")
    parser.add_argument("--flood", type=int, default=25, help="10 MB images each of 4 streams sends")
    args = parser.parse_args()
    cells = sample_images(args.concurrent)
    cases = {"ordinary cells (baseline)": ("lymphoblast", cells),
             **{f"{w} x {h} px PNG": ("lymphoblast", [canvas(w, h, cells[0])] * args.concurrent)
                for w, h in ((1000, 25000), (25000, 1000), (5000, 5000))}}
    white = io.BytesIO()
    Image.new("RGB", (5000, 5000), "white").save(white, format="PNG")
    cases["smear-field: white 5000 x 5000 PNG"] = ("smear-field", [white.getvalue()] * args.concurrent)
    cases["smear-field: 5000 x 5000 smear JPEG"] = ("smear-field", [smear(5000, 5000)] * args.concurrent)
    server = start_server(args.port, "--http-port", str(args.port + 1))
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
            left_behind(client, server, args.repeat, cells[0], f"http://127.0.0.1:{args.port + 1}")
            flood(client, server, args.flood)
    finally:
        server.send_signal(15)
        server.wait(60)
    return 0


def left_behind(client: Client, server, repeat: int, cell: bytes, http: str) -> None:
    """RSS after every 10 of `repeat` requests of each kind, one caller, one after another."""
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1800, 1800, 3), np.uint8)).save(noise, format="PNG")
    truncated = noise.getvalue()[: len(noise.getvalue()) // 2]  # a malformed 5 MB image: INVALID_ARGUMENT mid-decode

    def rest(body: bytes) -> None:
        request = urllib.request.Request(f"{http}/v2/models/lymphoblast/infer", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=120).read()
        except urllib.error.HTTPError as error:
            error.read()

    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(truncated).decode()]}
    kinds = {"ordinary cells (baseline)": lambda: client.classify(cell),
             "truncated 5 MB PNG": lambda: client.classify(truncated),
             "unknown version, 10 MB PNG": lambda: client.classify(noise.getvalue(), model_version="9.9.9"),
             "truncated 5 MB PNG x4, one stream": lambda: list(client.classify_stream([truncated] * 4)),
             "REST: truncated 5 MB PNG": lambda: rest(json.dumps({"inputs": [tensor]}).encode()),
             "REST: 8 MB that is not JSON": lambda: rest(b"{" + b"x" * 8_000_000)}
    print(f"what {repeat} requests of each kind leave behind, one after another (RSS over the kind's start, every 10):")
    for name, send in kinds.items():
        start, trace = rss_mb(server.pid), []
        for k in range(repeat):
            try:
                send()
            except DxServeError:
                pass
            if k % 10 == 9:
                trace.append(f"{rss_mb(server.pid) - start:+.0f}")
        print(f"  {name:36s}: {' '.join(trace)} MB (from {start:.0f} MB)")


def flood(client: Client, server, count: int) -> None:
    """Peak RSS while 4 streams each send `count` 10 MB images at once (read ahead, held until answered)."""
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1900, 1900, 3), np.uint8)).save(noise, format="PNG",
                                                                                                compress_level=0)
    image, start = noise.getvalue(), rss_mb(server.pid)
    peak, seconds = peak_while(server.pid, lambda: concurrently(4, lambda k: list(client.classify_stream([image] * count))))
    print(f"4 streams x {count} images of {len(image) / 2**20:.1f} MB at once: peak {peak - start:+.0f} MB over "
          f"{start:.0f} MB, {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
