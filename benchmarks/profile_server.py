"""What the server's threads do while they hold the GIL, in ms per cell, from py-spy.

    pip install -e ".[profile]"
    python benchmarks/profile_server.py [--images 256] [--streams 4] [--seconds 20]

A real server (`dxserve serve`, the default model, audit trail on) classifies the cells in
4 concurrent streams, over and over, while py-spy samples it (`--gil`: only the thread that
holds the GIL, 200 samples a second, without stopping the process). Printed: the GIL-held time
of each of its threads per classified cell, and for the event loop (the one thread every
request passes through, so its time is the serial part of the server) its functions by their
own time and by their time with what they call. gRPC's asyncio core is compiled (Cython), so
its reading and writing of messages shows as the own time of asyncio's `Handle._run` and of the
`async for` over a stream's requests; TensorFlow releases the GIL while it computes, so the
model's threads show little. `benchmarks/per_image.py` gives the same threads' CPU time.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import sample_images, start_server, streaming  # noqa: E402

RATE_HZ = 200


def read_raw(path: Path) -> list[tuple[str, list[str], int]]:
    """py-spy's raw (collapsed) stacks: (thread name, frames outermost first, samples)."""
    rows = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        rows.append((thread.split(": ", 1)[-1], frames, int(count)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=20, help="how long py-spy samples")
    parser.add_argument("--port", type=int, default=50097)
    parser.add_argument("--top", type=int, default=12, help="event-loop functions printed")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit('py-spy is not installed: pip install -e ".[profile]"')
    data, address = sample_images(args.images), f"127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw.txt"
        server = start_server(args.port, audit_db=str(Path(folder) / "audit.sqlite3"))
        try:
            streaming(address, data, args.streams)  # warm
            spy = subprocess.Popen([py_spy, "record", "--pid", str(server.pid), "--rate", str(RATE_HZ), "--gil",
                                    "--threads", "--nonblocking", "--format", "raw", "--duration", str(args.seconds),
                                    "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            cells, done = [0], threading.Event()

            def load() -> None:
                while not done.is_set():
                    streaming(address, data, args.streams)
                    cells[0] += len(data) + 64  # streaming() sends a 64-image warm-up stream first

            started = time.monotonic()
            loader = threading.Thread(target=load)
            loader.start()
            _, err = spy.communicate()
            seconds = time.monotonic() - started
            done.set()
            loader.join()
        finally:
            server.terminate()
            server.wait(60)
        if spy.returncode != 0 or not raw.exists():
            sys.exit(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")
        rows = read_raw(raw)
    per_cell = cells[0] * min(1.0, args.seconds / seconds)  # cells classified while py-spy sampled, about
    ms = 1000 / RATE_HZ / per_cell  # ms per cell that one sample stands for
    print(f"{per_cell:.0f} cells in {args.seconds} s sampled ({per_cell / args.seconds:.1f} images/s, "
          f"{args.streams} streams); GIL held, ms per cell:")
    by_thread = collections.Counter()
    for thread, _, n in rows:
        by_thread[thread.rstrip("0123456789").rstrip("_")] += n
    for thread, n in by_thread.most_common():
        print(f"  {thread:40s} {n * ms:6.3f} ms")
    own, total = collections.Counter(), collections.Counter()
    for thread, frames, n in rows:
        if thread == "MainThread" and frames:
            own[frames[-1]] += n
            for function in {f.rsplit(":", 1)[0] + ")" for f in frames}:  # by function, not line
                total[function] += n
    print("the event loop (MainThread), by own time (function and line):")
    for frame, n in own.most_common(args.top):
        print(f"  {n * ms:6.3f} ms  {frame}")
    print("the event loop's dxserve functions, with what they call:")
    for frame, n in [(f, n) for f, n in total.most_common() if "dxserve/" in f and "cli.py" not in f][:args.top]:
        print(f"  {n * ms:6.3f} ms  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
