"""Load benchmark: unary Classify at 1, 16 and 64 concurrent callers, against the same
single-image work in process, in one run: the batcher dispatching at once (max_batch_wait_ms
0, the default), the old fixed 5 ms wait, and two worker processes on one port.

    python benchmarks/load.py [--seconds 8] [--callers 1 16 64]
    python benchmarks/load.py --streams 32 --stream-items 500   # only: many long streams, default settings
    python benchmarks/load.py --streams 32 --stream-items 500 --restart-after 20   # the same through a SIGTERM and restart

Streams: N concurrent ClassifyStream calls of M images each against a server with default
settings; every item must come back, in order, and none refused (backpressure, not shedding).

Restart: the streams scenario, with the server sent SIGTERM after --restart-after seconds and
a new one started on the port once it exited; the clients resume (resume_within_s). Printed:
every image answered once and in order, and the old server's exit time against its grace
(a ratio above 1 means the drain overran it).

Baseline: the latency of one image through decode + quality gate + preprocess + model in
this process (what one caller's request costs without gRPC). Printed as ratios against it,
so read them, not the absolute numbers, on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import concurrently, load_runtime, rss_mb, sample_images, start_server  # noqa: E402

from dxserve.images import to_rgb  # noqa: E402
from dxserve_client import Client  # noqa: E402


def in_process_p50(runtime, images: list[bytes], n: int = 100, warm_up: int = 20) -> float:
    latencies = []
    for i in range(n + warm_up):
        started = time.perf_counter()
        rgb = to_rgb(Image.open(io.BytesIO(images[i % len(images)])))
        runtime.check_quality(rgb)
        runtime.predict(runtime.preprocess(rgb)[None])
        if i >= warm_up:
            latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies)


def load(address: str, images: list[bytes], callers: int, seconds: float) -> tuple[float, float, float, int]:
    """(images/s, p50 ms, p99 ms, refused) with `callers` threads calling Classify back to back."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    refused = [0] * callers
    stop = time.monotonic() + seconds

    def caller(k: int) -> None:
        with Client(address) as client:
            i = k
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    client.classify(images[i % len(images)])
                    latencies[k].append((time.perf_counter() - started) * 1000)
                except Exception:
                    refused[k] += 1
                i += callers

    elapsed = concurrently(callers, caller)
    flat = [x for per in latencies for x in per]
    return len(flat) / elapsed, statistics.median(flat), float(np.percentile(flat, 99)), sum(refused)


def streams(address: str, images: list[bytes], n: int, items: int, resume_within_s: float = 0.0) -> None:
    """n concurrent streams of `items` images: results, order, refusals, throughput."""
    outcomes: list[list[tuple[str, str]]] = [[] for _ in range(n)]

    def run(k: int) -> None:
        with Client(address) as client:
            sent = [(f"{k}-{i}", images[(k + i) % len(images)]) for i in range(items)]
            outcomes[k] = [(r.request_id, r.error_code) for r in client.classify_stream(sent, resume_within_s=resume_within_s)]

    elapsed = concurrently(n, run)
    results = sum(len(o) for o in outcomes)
    in_order = all([rid for rid, _ in o] == [f"{k}-{i}" for i in range(items)] for k, o in enumerate(outcomes))
    refused = sum(code == "RESOURCE_EXHAUSTED" for o in outcomes for _, code in o)
    failed = sum(bool(code) for o in outcomes for _, code in o)
    print(f"{n} streams x {items} images, default settings: {results} results of {n * items}, in order: {in_order}, "
          f"refused: {refused}, other errors: {failed - refused}; {results / elapsed:.1f} images/s over {elapsed:.0f} s")


def restart(servers: list, port: int, flags: tuple[str, ...], after_s: float, grace_s: float = 10.0) -> None:
    """SIGTERM the server after `after_s`, time its exit against the grace, start a new one on the port."""
    time.sleep(after_s)
    stopped = time.monotonic()
    servers[0].send_signal(15)
    code = servers[0].wait(120)
    exit_s = time.monotonic() - stopped
    print(f"SIGTERM after {after_s:.0f} s: exit code {code} in {exit_s:.1f} s, grace {grace_s:.0f} s "
          f"(exit / grace {exit_s / grace_s:.2f})", flush=True)
    servers.append(start_server(port, *flags, warm_up=False))  # the resumed streams are its warm-up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--port", type=int, default=50098)
    parser.add_argument("--streams", type=int, default=0, help="run only the streams scenario with this many streams")
    parser.add_argument("--stream-items", type=int, default=500)
    parser.add_argument("--restart-after", type=float, default=0.0, help="streams: SIGTERM the server after this many "
                        "seconds and start another on the port; the clients resume")
    args = parser.parse_args()
    if args.streams:
        flags = ("--max-streams-per-caller", str(args.streams), "--max-calls-per-caller", "256")
        servers = [start_server(args.port, *flags)]
        restarter = threading.Thread(target=restart, args=(servers, args.port, flags, args.restart_after), daemon=True)
        if args.restart_after:
            restarter.start()
        try:
            streams(f"127.0.0.1:{args.port}", sample_images(64), args.streams, args.stream_items, 120 if args.restart_after else 0)
        finally:
            if args.restart_after:
                restarter.join()
            servers[-1].send_signal(15)
            servers[-1].wait(60)
        return 0

    images = sample_images(64)
    runtime = load_runtime()
    baseline = in_process_p50(runtime, images)
    print(f"machine: {os.cpu_count()} CPU cores; in-process single image (decode+gate+prep+model) p50 {baseline:.1f} ms (baseline)")
    address = f"127.0.0.1:{args.port}"
    rates: dict[tuple[str, int], float] = {}
    for key, label, flags in (("now", "1 worker, dispatch at once (max_batch_wait_ms 0, default)", ()),
                              ("wait", "1 worker, fixed 5 ms batch wait (old default)", ("--max-batch-wait-ms", "5")),
                              ("workers", "2 workers, dispatch at once", ("--workers", "2"))):
        server = start_server(args.port, "--max-calls-per-caller", "256", *flags)
        single = key != "workers"  # the supervisor's RSS says nothing of its workers'
        try:
            print(label + (f"; server RSS at ready {rss_mb(server.pid):.0f} MB" if single else ""))
            for callers in args.callers:
                rate, p50, p99, refused = load(address, images, callers, args.seconds)
                rates[key, callers] = rate
                print(f"  {callers:3d} callers: {rate:6.1f} images/s, p50 {p50:7.1f} ms, p99 {p99:7.1f} ms, refused {refused}"
                      + (f"; p50 - baseline {p50 - baseline:+.1f} ms, ratio {p50 / baseline:.2f}" if callers == 1 else "")
                      + (f"; RSS after {rss_mb(server.pid):.0f} MB" if single else ""))
        finally:
            server.send_signal(15)
            server.wait(60)
    print(f"in-process single image p50 again, after the servers: {in_process_p50(runtime, images):.1f} ms")
    for callers in args.callers:
        print(f"{callers:3d} callers, throughput ratios: dispatch at once / 5 ms wait {rates['now', callers] / rates['wait', callers]:.2f}, "
              f"2 workers / 1 worker {rates['workers', callers] / rates['now', callers]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
