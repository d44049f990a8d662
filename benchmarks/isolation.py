"""Isolation benchmark: does a burst of explanations hold up another caller's classification?

    python benchmarks/isolation.py [--explainers 100] [--calls 150]

One server (lymphoblast, default settings) and two callers with their own tokens. Caller
"plain" makes sequential unary Classify calls: first alone (idle), then while caller "burst"
runs `--explainers` concurrent explain=true calls, each retrying after the RetryInfo delay
when refused (as a polite client does) until the plain calls are done. Printed: plain p50/p99
idle and under the burst, and their ratio (the bar: p99 under the burst within 2x idle), the
burst's explanations made and refusals, and the server's RSS before, at the peak and after.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import peak_while, rss_mb, sample_images, start_server  # noqa: E402

from dxserve.auth import KeyFile  # noqa: E402
from dxserve_client import Client, DxServeError  # noqa: E402


def latencies(client: Client, images: list[bytes], n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        client.classify(images[i % len(images)])
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):7.1f} ms, p99 {np.percentile(values, 99):7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explainers", type=int, default=100)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--port", type=int, default=50097)
    args = parser.parse_args()
    images = sample_images(32)
    with tempfile.TemporaryDirectory() as folder:
        keys = KeyFile.load(Path(folder) / "callers.json")
        tokens = {name: keys.add(name, []) for name in ("plain", "burst")}
        keys.save()
        server = start_server(args.port, "--auth-keys-file", str(keys.path), "--max-calls-per-caller", str(args.explainers + 8),
                              token=tokens["plain"])
        address = f"127.0.0.1:{args.port}"
        try:
            with Client(address, token=tokens["plain"], timeout_s=120) as plain, \
                    Client(address, token=tokens["burst"], timeout_s=120) as burst:
                rss_before = rss_mb(server.pid)
                idle = latencies(plain, images, args.calls)
                done, made, refused = threading.Event(), [0], [0]

                def explainer(k: int) -> None:
                    while not done.is_set():
                        try:
                            burst.classify(images[k % len(images)], explain=True)
                            made[0] += 1
                        except DxServeError as error:
                            if error.reason != "EXPLANATIONS_FULL":
                                raise
                            refused[0] += 1
                            done.wait(2.0)  # the RetryInfo delay

                threads = [threading.Thread(target=explainer, args=(k,)) for k in range(args.explainers)]
                for t in threads:
                    t.start()
                time.sleep(2.0)  # the burst is under way
                during: list[float] = []
                peak, _ = peak_while(server.pid, lambda: during.extend(latencies(plain, images, args.calls)))
                done.set()
                for t in threads:
                    t.join()
                time.sleep(2.0)
                rss_after = rss_mb(server.pid)
                print(f"plain caller, idle:                       {summary(idle)}")
                print(f"plain caller, {args.explainers} explain calls running: {summary(during)}")
                print(f"p99 under the burst / p99 idle: {np.percentile(during, 99) / np.percentile(idle, 99):.2f} "
                      f"(p50 ratio {statistics.median(during) / statistics.median(idle):.2f}); bar: 2")
                print(f"burst: {made[0]} explanations made, {refused[0]} refusals (EXPLANATIONS_FULL, retried after 2 s)")
                print(f"server RSS: {rss_before:.0f} MB before, {peak:.0f} MB peak, {rss_after:.0f} MB after")
        finally:
            server.send_signal(15)
            server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
