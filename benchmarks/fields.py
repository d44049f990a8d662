"""A smear of microscope fields end to end: smear-field finds the white cells, lymphoblast
classifies each, through the server, against the same work in process, in one run.

    python benchmarks/fields.py [--fields 500] [--data ../shared/data/bccd]

Fields: BCCD's images (all splits, cycled to --fields; the test fixtures when the data set is
not there). Printed:
1. in process (baseline): decode, find the cells and prepare each for lymphoblast in a thread
   pool, in parallel with lymphoblast's model in batches of 32, as the server does;
2. through the server: one ClassifyStream of every field with plugin smear-field and one
   specimen_id (default settings, audit trail on), every cell answered by lymphoblast and
   counted in the specimen's summary;
the seconds of each, their ratio (above 1: the server's own cost), fields/s and cells/s, and
the issue's target (a 500-field smear in at most 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ROOT, load_runtime, start_server  # noqa: E402

from dxserve.images import to_rgb  # noqa: E402
from dxserve_client import Client  # noqa: E402


def fields(data: Path, n: int) -> list[bytes]:
    files = sorted((data / "JPEGImages").glob("*.jpg")) or sorted((ROOT / "tests" / "fixtures" / "fields").glob("*.jpg"))
    return [files[i % len(files)].read_bytes() for i in range(n)]


def in_process(images: list[bytes], batch: int = 32) -> tuple[float, int]:
    """(seconds, cells) for the whole smear in this process."""
    from dxserve_smear_field.plugin import SmearFieldRuntime

    finder = SmearFieldRuntime(SmearFieldRuntime.versions()[0])
    finder.load()
    classifier = load_runtime()

    def prepare(data: bytes) -> list[np.ndarray]:
        found, _ = finder.find_objects(to_rgb(Image.open(io.BytesIO(data))))
        return [classifier.prepare(o.image)[0] for o in found]

    started, cells, pending = time.perf_counter(), 0, []
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for prepared in pool.map(prepare, images):
            pending += prepared
            while len(pending) >= batch:
                classifier.predict_with_issues(np.stack(pending[:batch]))
                cells, pending = cells + batch, pending[batch:]
        if pending:
            classifier.predict_with_issues(np.stack(pending))
            cells += len(pending)
    return time.perf_counter() - started, cells


def through_server(address: str, images: list[bytes]) -> tuple[float, int, dict]:
    """(seconds, cells, the specimen's final summary) for one stream of every field."""
    finals: list = []
    with Client(address) as client:
        started = time.perf_counter()
        results = list(client.classify_stream(((f"field-{i}", data, "smear-1") for i, data in enumerate(images)),
                                              plugin="smear-field", final_summaries=finals))
        seconds = time.perf_counter() - started
    assert len(results) == len(images) and all(r.ok for r in results), "a field failed"
    return seconds, sum(r.field.found for r in results), finals[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=500)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "bccd")
    parser.add_argument("--port", type=int, default=50096)
    args = parser.parse_args()
    images = fields(args.data, args.fields)
    baseline_s, baseline_cells = in_process(images)
    server = start_server(args.port, warm_up=True)
    try:
        served_s, cells, summary = through_server(f"127.0.0.1:{args.port}", images)
    finally:
        server.terminate()
        server.wait(60)
    print(f"machine: {os.cpu_count()} CPU cores; {len(images)} fields")
    print(f"in process (baseline): {baseline_s:.1f} s, {baseline_cells} cells, {len(images) / baseline_s:.1f} fields/s")
    print(f"through the server: {served_s:.1f} s, {cells} cells, {len(images) / served_s:.1f} fields/s, "
          f"{cells / served_s:.1f} cells/s; server / in process {served_s / baseline_s:.2f}; "
          f"target <= 60 s for 500 fields: {'met' if served_s * 500 / len(images) <= 60 else 'missed'}")
    print(f"specimen summary: {summary.cells_seen} cells, {summary.cells_passed_gate} passed lymphoblast's gate, "
          f"{summary.indeterminate} indeterminate, {summary.cells_failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
