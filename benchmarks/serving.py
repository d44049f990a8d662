"""Serving benchmark: the lymphoblast plugin in process vs the same work over gRPC.

    python benchmarks/serving.py [--images 512] [--streams 4] [--unary 100]

Everything is measured in one run on one machine, and figures are printed as ratios
between rates of the same run, because absolute numbers on a shared machine drift:

1. model only: `predict` on preprocessed batches of 32 (the model's own throughput); once,
   the same weights with 8-view test-time averaging (`-tta8`);
2. in process: decode PNG + quality gate + preprocess in a thread pool, in parallel with
   predict in batches of 32, no gRPC: the best the same work can do here (the baseline);
3. gRPC streaming: several concurrent ClassifyStream calls to a local server with its default
   settings (the SQLite audit trail on, synchronous=FULL, every result waiting for its row);
4. the same streams to a second server, running beside it, with the audit trail off.

Rates 1-4 are measured once a turn (`--rounds` turns, the order reversed each turn), so the
two sides of each ratio are seconds apart; each throughput ratio is printed as the median of
the turns' ratios with its range. Then: a 500-cell specimen stream end to end; unary latency
(sequential Classify calls, p50 and p99) on both servers; explanations (unary calls that ask
for one against the same calls that do not; the streaming figures are for requests that do not ask).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dxserve.images import to_rgb
from dxserve_client import Client

ROOT = Path(__file__).resolve().parent.parent
CELLS = ROOT / "tests" / "fixtures" / "cells"


def sample_images(n: int) -> list[bytes]:
    """n PNG-encoded cells: the shipped samples, rotated and flipped for variety."""
    base = [to_rgb(Image.open(p)) for p in sorted(CELLS.glob("*.png"))]
    out = []
    for i in range(n):
        rgb = np.rot90(base[i % len(base)], i // len(base) % 4)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def load_runtime(version: str | None = None):
    """The lymphoblast runtime of `version` (default: the shipped default), loaded."""
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version

    runtime = LymphoblastRuntime(find_version(version or ""))
    runtime.load()
    return runtime


def model_only(runtime, inputs: np.ndarray, batch: int = 32) -> float:
    """images/s of `predict` alone on preprocessed batches."""
    runtime.predict(inputs[:batch])  # warm up
    started = time.perf_counter()
    for i in range(0, len(inputs), batch):
        runtime.predict(inputs[i:i + batch])
    return len(inputs) / (time.perf_counter() - started)


class InProcess:
    """The same work without gRPC, on one loaded runtime, to be measured again in each turn:
    the model alone, and the best the server's work can do in process (the baseline)."""

    def __init__(self, images: list[bytes], batch: int = 32):
        self.runtime, self.images, self.batch = load_runtime(), images, batch
        self.inputs = np.stack([self.runtime.preprocess(_decode(d)) for d in images])
        self.runtime.predict(self.inputs[:batch])  # warm up

    def model_only(self) -> float:
        """images/s of `predict` alone on the preprocessed batches."""
        return model_only(self.runtime, self.inputs, self.batch)

    def pipeline(self) -> float:
        """images/s of decode + quality gate + preprocess in a thread pool, one thread per core,
        running ahead while the model predicts, as the server does: the baseline."""
        from concurrent.futures import ThreadPoolExecutor

        def prepare(data: bytes):  # what the server does per image: decode, quality gate, preprocess
            rgb = _decode(data)
            self.runtime.check_quality(rgb)
            return self.runtime.preprocess(rgb)

        started = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            prepared = [pool.submit(prepare, d) for d in self.images]
            for i in range(0, len(self.images), self.batch):
                self.runtime.predict(np.stack([f.result() for f in prepared[i:i + self.batch]]))
        return len(self.images) / (time.perf_counter() - started)


def _decode(data: bytes) -> np.ndarray:
    return to_rgb(Image.open(io.BytesIO(data)))


def start_server(port: int, *flags: str, audit_db: str = "", token: str = "", warm_up: bool = True) -> subprocess.Popen:
    """`dxserve serve` on 127.0.0.1:port with `flags`, once lymphoblast serves and (`warm_up`) has
    answered a few calls (made with `token`, on a server with callers)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "DXSERVE_AUDIT_DB": audit_db, "DXSERVE_HTTP_PORT": "0",
           "DXSERVE_METRICS_PORT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "dxserve.cli", "serve", "--address", f"127.0.0.1:{port}",
                               "--log-level", "WARNING", *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}", token=token or None) as client:
        client.wait_until_serving("lymphoblast", timeout_s=180)
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): is port {port} taken by another?")
        for image in sample_images(8 if warm_up else 0):
            client.classify(image)  # warm up
    return server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_while(pid: int, work) -> tuple[float, float]:
    """(peak RSS MB while `work()` runs, its seconds)."""
    peak, done = [rss_mb(pid)], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    seconds = work()
    done.set()
    watcher.join()
    return peak[0], seconds


def concurrently(n: int, work) -> float:
    """Run work(0) ... work(n - 1) in n threads at once; the seconds until all are done."""
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def streaming(address: str, images: list[bytes], streams: int) -> float:
    """images/s with `streams` concurrent ClassifyStream calls sharing the images."""
    shares = [images[i::streams] for i in range(streams)]
    counts = [0] * streams

    def run(k: int) -> None:
        with Client(address) as client:
            counts[k] = sum(r.ok for r in client.classify_stream(shares[k]))

    with Client(address) as client:
        list(client.classify_stream(images[:64]))  # warm up
    elapsed = concurrently(streams, run)
    assert sum(counts) == len(images), f"only {sum(counts)} of {len(images)} classified"
    return len(images) / elapsed


def specimen_seconds(address: str, cells: int) -> float:
    """Seconds for one stream of a `cells`-cell specimen, end to end (every cell answered)."""
    specimen = sample_images(cells)
    with Client(address) as client:
        started = time.perf_counter()
        answered = sum(r.ok for r in client.classify_stream(specimen, specimen_id="smear-1"))
        seconds = time.perf_counter() - started
    assert answered == cells, f"only {answered} of {cells} answered"
    return seconds


def unary_latency(address: str, images: list[bytes], calls: int, explain: bool = False) -> tuple[float, float]:
    latencies = []
    with Client(address) as client:
        client.classify(images[0], explain=explain)
        for i in range(calls):
            started = time.perf_counter()
            client.classify(images[i % len(images)], explain=explain)
            latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies), float(np.percentile(latencies, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--unary", type=int, default=100)
    parser.add_argument("--explained", type=int, default=12, help="unary calls with explain=true")
    parser.add_argument("--specimen", type=int, default=500, help="cells in the one-specimen stream")
    parser.add_argument("--port", type=int, default=50099, help="the audited server's; the other's is the next")
    parser.add_argument("--rounds", type=int, default=4, help="turns, each measuring every rate once")
    args = parser.parse_args()

    images = sample_images(args.images)
    local = InProcess(images)
    averaged = model_only(load_runtime(f"{local.runtime.version.version}-tta8"), local.inputs)
    address, unaudited = f"127.0.0.1:{args.port}", f"127.0.0.1:{args.port + 1}"
    with tempfile.TemporaryDirectory() as folder:
        # Both servers run side by side (an idle one costs nothing), and every rate is measured
        # once a turn, the order reversed each turn: a bar's two sides are measured seconds apart,
        # not minutes, and neither always comes first, when the machine is warmer or quieter.
        servers = [start_server(args.port, audit_db=str(Path(folder) / "audit.sqlite3")),
                   start_server(args.port + 1)]
        try:
            measure = {"model only": local.model_only, "in process": local.pipeline,
                       "streaming": lambda: streaming(address, images, args.streams),
                       "audit off": lambda: streaming(unaudited, images, args.streams)}
            rates = {name: [] for name in measure}
            for turn in range(args.rounds):
                for name in (list(measure) if turn % 2 == 0 else list(measure)[::-1]):
                    rates[name].append(measure[name]())
            specimen_s = specimen_seconds(address, args.specimen)
            p50, p99 = unary_latency(address, images, args.unary)
            unaudited_p50, unaudited_p99 = unary_latency(unaudited, images, args.unary)
            explained_p50, _ = unary_latency(address, images, args.explained, explain=True)
            plain_p50, _ = unary_latency(address, images, args.explained)  # the same calls, without
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(60)

    median = {name: statistics.median(r) for name, r in rates.items()}
    each = lambda name: " ".join(f"{r:.1f}" for r in rates[name])  # noqa: E731
    print(f"machine: {os.cpu_count()} CPU cores; {len(images)} PNG cells of 450x450 px; {args.rounds} turns, each measuring "
          "every rate once (order reversed each turn); medians, then each turn's")
    print(f"model only, batch 32, in process:        {median['model only']:8.1f} images/s   ({each('model only')})")
    print(f"  the same with 8-view averaging (-tta8): {averaged:8.1f} images/s   (cost: x{median['model only'] / averaged:.1f}, once)")
    print(f"in process, decode+gate+prep in parallel with the model: {median['in process']:8.1f} images/s   (baseline; "
          f"{each('in process')})")
    print(f"gRPC streaming, {args.streams} concurrent streams, audit trail on, no explanations: {median['streaming']:8.1f} "
          f"images/s   ({each('streaming')})")
    print(f"the same streams, audit trail off: {median['audit off']:8.1f} images/s   ({each('audit off')})")
    for label, over, bar in (("streaming / model only", "model only", 0.85), ("streaming / in-process baseline", "in process", 0.95),
                             ("audit on / off, streaming", "audit off", 0.95)):
        turns = [s / o for s, o in zip(rates["streaming"], rates[over], strict=True)]
        print(f"throughput ratio {label}: {statistics.median(turns):.2f}, turns {min(turns):.2f}-{max(turns):.2f} "
              f"({' '.join(f'{t:.2f}' for t in turns)}; issue 16's bar {bar})")
    print(f"one stream of a {args.specimen}-cell specimen, end to end: {specimen_s:.2f} s "
          f"({args.specimen / specimen_s:.1f} images/s; issue 16's bar: 500 cells in 4 s)")
    print(f"gRPC unary latency ({args.unary} sequential calls): p50 {p50:.1f} ms, p99 {p99:.1f} ms; audit trail off: "
          f"p50 {unaudited_p50:.1f} ms, p99 {unaudited_p99:.1f} ms")
    print(f"explain=true unary p50 {explained_p50:.0f} ms vs {plain_p50:.0f} ms without ({args.explained} calls each): "
          f"x{explained_p50 / plain_p50:.1f} for the requests that ask")
    return 0


if __name__ == "__main__":
    sys.exit(main())
