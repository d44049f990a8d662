"""LiteRT against TensorFlow: the same lymphoblast version, the same server code, the two runtimes.

    python benchmarks/litert.py [--rounds 4] [--images 384]

Needs the `train` extra (TensorFlow) for the TensorFlow side. Everything is measured in one run,
each figure as a ratio LiteRT / TensorFlow between rates of the same turn (the order reversed
each turn), printed as the median of the turns with its range:

1. model only, in process: `predict` on preprocessed batches of 12 (the server's batch) and of 1;
2. two servers side by side (`dxserve serve`, audit trail on, defaults), one per runtime
   (DXSERVE_LYMPHOBLAST_RUNTIME): seconds from the process start to lymphoblast READY, RSS at
   ready; then each turn 4 concurrent ClassifyStream calls, 16 callers of unary Classify, and
   one caller's unary p50; last, RSS after 64 callers.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dxserve.images import to_rgb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import load  # noqa: E402
from serving import rss_mb, sample_images, start_server, streaming, unary_latency  # noqa: E402

RUNTIMES = ("litert", "tensorflow")


def runtime_of(name: str, version: str = ""):
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version, shipped_versions

    default = find_version(version)
    runtime = LymphoblastRuntime(next(v for v in shipped_versions(runtime=name) if v.version == default.version))
    started = time.perf_counter()
    runtime.load()
    return runtime, time.perf_counter() - started


def model_rate(runtime, inputs: np.ndarray, batch: int, seconds: float = 3.0) -> float:
    runtime.predict(inputs[:batch])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runtime.predict(inputs[done % (len(inputs) - batch):][:batch])
        done += batch
    return done / (time.perf_counter() - started)


def started_server(name: str, port: int, folder: str):
    """A server on `name`'s runtime; (process, seconds to READY after its start)."""
    os.environ["DXSERVE_LYMPHOBLAST_RUNTIME"] = name
    try:
        started = time.perf_counter()
        server = start_server(port, audit_db=str(Path(folder) / f"audit-{name}.sqlite3"), warm_up=False)
        return server, time.perf_counter() - started
    finally:
        os.environ.pop("DXSERVE_LYMPHOBLAST_RUNTIME", None)


def ratio_line(label: str, rates: dict[str, list[float]]) -> str:
    turns = [a / b for a, b in zip(rates["litert"], rates["tensorflow"], strict=True)]
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return (f"{label}: LiteRT {medians['litert']:.1f}, TensorFlow {medians['tensorflow']:.1f}; LiteRT / TensorFlow "
            f"{statistics.median(turns):.2f} (turns {min(turns):.2f}-{max(turns):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=6.0, help="of each 16-caller load")
    parser.add_argument("--port", type=int, default=50097, help="LiteRT's server; TensorFlow's is the next")
    parser.add_argument("--skip-servers", action="store_true")
    args = parser.parse_args()

    images = sample_images(args.images)
    runtimes = {}
    for name in RUNTIMES:
        runtimes[name], load_s = runtime_of(name)
        print(f"{name}: version {runtimes[name].version.version} ({runtimes[name].version.weights.name}) loaded in {load_s:.2f} s")
    inputs = np.stack([runtimes["litert"].preprocess(to_rgb(Image.open(io.BytesIO(b)))) for b in images[:96]])
    model = {batch: {name: [] for name in RUNTIMES} for batch in (12, 1)}
    for turn in range(args.rounds):
        for name in (RUNTIMES if turn % 2 == 0 else RUNTIMES[::-1]):
            for batch in model:
                model[batch][name].append(model_rate(runtimes[name], inputs, batch))
    print(f"machine: {os.cpu_count()} CPU cores; {args.rounds} turns, order reversed each turn")
    for batch, rates in model.items():
        print(ratio_line(f"model only, batch {batch}, images/s", rates))
    del runtimes
    if args.skip_servers:
        return 0

    with tempfile.TemporaryDirectory() as folder:
        servers, ready_s, ready_rss = {}, {}, {}
        try:
            for offset, name in enumerate(RUNTIMES):
                servers[name], ready_s[name] = started_server(name, args.port + offset, folder)
                ready_rss[name] = rss_mb(servers[name].pid)
            address = {name: f"127.0.0.1:{args.port + offset}" for offset, name in enumerate(RUNTIMES)}
            for name in RUNTIMES:
                print(f"{name} server: READY {ready_s[name]:.1f} s after its start, RSS at ready {ready_rss[name]:.0f} MB")
            rates = {"streaming": {n: [] for n in RUNTIMES}, "16 callers": {n: [] for n in RUNTIMES},
                     "unary p50": {n: [] for n in RUNTIMES}}
            for turn in range(args.rounds):
                for name in (RUNTIMES if turn % 2 == 0 else RUNTIMES[::-1]):
                    rates["streaming"][name].append(streaming(address[name], images, 4))
                    rates["16 callers"][name].append(load(address[name], images, 16, args.seconds)[0])
                    rates["unary p50"][name].append(unary_latency(address[name], images, 60)[0])
            print(ratio_line("gRPC streaming, 4 streams, images/s", rates["streaming"]))
            print(ratio_line("16 unary callers, images/s", rates["16 callers"]))
            print(ratio_line("one caller's unary p50, ms", rates["unary p50"]))
            for name in RUNTIMES:
                load(address[name], images, 64, args.seconds)
                print(f"{name} server: RSS after 64 callers {rss_mb(servers[name].pid):.0f} MB")
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
