"""Where a cell's CPU goes: each stage of the per-image path, in ms of CPU per cell.

    python benchmarks/per_image.py [--images 256] [--streams 4] [--specimen 500]

In this process, one stage at a time over the same PNG cells (this thread's CPU time; for the
model the process's, so its own threads count): decoding the request's image, the plugin's
`prepare` (quality gate + preprocessing, which share one foreground mask), the model at batch
32, building the response, and the audit row (record, canonical JSON, hash). Then a real server:
its CPU per cell while 4 streams classify the same cells (from /proc), so "the rest" (gRPC,
protobuf, asyncio, routing, batching, the audit database) is what the server spends beyond the
stages; the same CPU split by the server's threads (named by role in the kernel,
`dxserve.threads`), and the load generator's own CPU, which shares the cores. Last, one stream
of a 500-cell specimen, end to end, and the server's RSS at ready, at its peaks and after
(`--specimen 5000`: a long stream). With `--decisions FILE`, the probabilities and quality
issues of 200 developer cells (`--data`) are written (the code before a change) or compared with
(after it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import load_runtime, peak_while, rss_mb, sample_images, specimen_seconds, start_server, streaming  # noqa: E402

from dxserve import audit, images  # noqa: E402
from dxserve.batcher import Result  # noqa: E402
from dxserve.v1 import diagnostics_pb2 as pb  # noqa: E402


def cpu_ms_per(n: int, work, clock=time.thread_time) -> tuple[float, object]:
    """ms of CPU per item of `work()`: this thread's (the default: a stage that runs in the calling
    thread alone, so TensorFlow's pools spinning down after a model call are not counted), or with
    `clock=time.process_time` the whole process's (the model, whose work runs in its own pools)."""
    started = clock()
    out = work()
    return (clock() - started) * 1000 / n, out


def cpu_s(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_s(pid: int) -> float:
    return cpu_s(Path(f"/proc/{pid}/stat"))


MODEL = "model: its thread and TensorFlow's and BLAS's pools"
GRPC = "gRPC's transport threads"
EVENT_LOOP = "event loop: gRPC calls, protobuf, asyncio, responses"
#: The server's threads by what they do, from their kernel names (dxserve.threads); first match wins.
THREAD_ROLES = (
    ("dx-decode", "decode threads: decode, quality gate, preprocess"),
    ("dx-model", MODEL),
    ("tf_", MODEL),
    ("dx-audit", "audit writer: canonical JSON, hash chain, SQLite"),
    ("dx-explain", "explanations"),
    ("event_engine", GRPC),
    ("grpc", GRPC),
)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """The server's CPU seconds so far by role (THREAD_ROLES); the main thread runs the event
    loop, and the unnamed rest are native pools (TensorFlow's, OpenBLAS's), counted as model."""
    main = Path(f"/proc/{pid}/task/{pid}/comm").read_text().strip()
    roles: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, seconds = (task / "comm").read_text().strip(), cpu_s(task / "stat")
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        role = EVENT_LOOP if task.name == str(pid) else next(
            (r for prefix, r in THREAD_ROLES if name.startswith(prefix)),
            MODEL if name == main else f"other ({name})")
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


def stages(data: list[bytes]) -> dict[str, float]:
    from dxserve.service import DiagnosticsService

    runtime = load_runtime()
    requests = [pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(encoded=d)) for d in data]
    n = len(data)
    out = {}
    out["decode (PNG -> RGB)"], rgbs = cpu_ms_per(n, lambda: [images.decode(r.image, 25_000_000) for r in requests])
    prepare = prepare_of(runtime)
    out["quality gate + preprocess (prepare)"], prepared = cpu_ms_per(n, lambda: [prepare(rgb) for rgb in rgbs])
    batch = np.stack([p[0] for p in prepared])
    out["model, batch 32 (2 views, OOD features)"], probabilities = cpu_ms_per(
        n, lambda: np.concatenate([runtime.predict(batch[i:i + 32]) for i in range(0, n, 32)]), time.process_time)
    results = [Result(p, runtime.decide(p), 0.0, 0.0, 32, ()) for p in probabilities]
    service = DiagnosticsService.__new__(DiagnosticsService)
    entry = type("Entry", (), {"name": "lymphoblast"})()
    out["response (decide + ClassifyResponse)"], responses = cpu_ms_per(
        n, lambda: [service._response(str(i), entry, runtime, r, []) for i, r in enumerate(results)])

    def rows():
        previous = ""
        for request, response in zip(requests, responses, strict=True):
            record = audit.outcome_record("Classify", "anonymous", request, response.request_id, response, 0.01)
            record["input_sha256"] = audit.input_sha256(record.pop("image"))
            previous = audit.row_hash(previous, record)

    out["audit row (record, image SHA-256, chained hash)"], _ = cpu_ms_per(n, rows)
    return out


def decisions(data_dir: Path, n: int) -> dict:
    """{path: [P(lymphoblast), quality issue codes]} of n developer cells, through `prepare` and `predict`."""
    import csv

    from PIL import Image

    from dxserve.images import to_rgb

    rows = list(csv.DictReader((data_dir / "manifest.csv").open()))
    picked = [rows[i]["path"] for i in np.linspace(0, len(rows) - 1, n).astype(int)]
    runtime = load_runtime()
    prepared = [prepare_of(runtime)(to_rgb(Image.open(data_dir / path))) for path in picked]
    probabilities = runtime.predict(np.stack([x for x, _ in prepared]))
    return {path: [float(p[0]), [i.code for i in issues]] for path, p, (_, issues) in zip(picked, probabilities, prepared, strict=True)}


def compare(now: dict, before: dict) -> str:
    assert now.keys() == before.keys(), "not the same cells"
    worst = max(abs(now[k][0] - before[k][0]) for k in now)
    same_issues = all(now[k][1] == before[k][1] for k in now)
    return (f"same decisions as before on {len(now)} developer cells: max |P difference| {worst:.1e} (bar 1e-5), "
            f"quality issues identical: {same_issues}")


def prepare_of(runtime):
    """The runtime's `prepare`, or (code before it existed) its two calls."""
    return getattr(runtime, "prepare", None) or (lambda rgb: (runtime.preprocess(rgb), runtime.check_quality(rgb)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--specimen", type=int, default=500, help="cells in the one-specimen stream")
    parser.add_argument("--port", type=int, default=50098)
    parser.add_argument("--check", type=int, default=200, help="developer cells for the same-decisions check (0: skip)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cnmc2019"))
    parser.add_argument("--decisions", type=Path, help="a JSON file of the check's decisions: compared with when it "
                        "exists (from a run of the code before a change), written otherwise")
    args = parser.parse_args()
    data = sample_images(args.images)
    measured = stages(data)
    address = f"127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as folder:
        server = start_server(args.port, audit_db=str(Path(folder) / "audit.sqlite3"))
        try:
            ready_mb = rss_mb(server.pid)
            before, threads_before, client_before = server_cpu_s(server.pid), thread_cpu_s(server.pid), time.process_time()
            streams_peak_mb, rate = peak_while(server.pid, lambda: streaming(address, data, args.streams))  # + a 64-image warm-up
            cells = len(data) + 64
            client_ms = (time.process_time() - client_before) * 1000 / cells
            total = (server_cpu_s(server.pid) - before) * 1000 / cells
            by_role = {role: (seconds - threads_before.get(role, 0.0)) * 1000 / cells
                       for role, seconds in thread_cpu_s(server.pid).items()}
            specimen_peak_mb, specimen_s = peak_while(server.pid, lambda: specimen_seconds(address, args.specimen))
            after_mb = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(60)
    print(f"machine: {os.cpu_count()} CPU cores; {len(data)} PNG cells of 450x450 px; ms of CPU per cell")
    for stage, ms in measured.items():
        print(f"  {stage:52s} {ms:7.2f} ms  {ms / total:6.1%} of the server's")
    rest = total - sum(measured.values())
    print(f"  {'the rest (gRPC, protobuf, asyncio, batching, audit DB)':52s} {rest:7.2f} ms  {rest / total:6.1%}")
    print(f"server CPU per cell while {args.streams} streams classify: {total:.2f} ms ({rate:.1f} images/s); "
          f"outside the model: {total - measured['model, batch 32 (2 views, OOD features)']:.2f} ms")
    print("  the same by the server's threads (their kernel names, dxserve.threads):")
    for role, ms in sorted(by_role.items(), key=lambda kv: -kv[1]):
        if ms >= 0.005:
            print(f"    {role:62s} {ms:7.2f} ms  {ms / total:6.1%}")
    print(f"  the load generator (this process, the same cores): {client_ms:.2f} ms of CPU per cell")
    print(f"one stream of a {args.specimen}-cell specimen: all answered in {specimen_s:.2f} s "
          f"({args.specimen / specimen_s:.1f} images/s)")
    print(f"server RSS: {ready_mb:.0f} MB at ready, peak {streams_peak_mb:.0f} MB during the {args.streams} streams and "
          f"{specimen_peak_mb:.0f} MB during the specimen stream, {after_mb:.0f} MB after")
    if args.check and (args.data / "manifest.csv").exists() and args.decisions:
        import json

        now = decisions(args.data, args.check)
        if args.decisions.exists():
            print(compare(now, json.loads(args.decisions.read_text())))
        else:
            args.decisions.write_text(json.dumps(now))
            print(f"decisions of {len(now)} developer cells written to {args.decisions}: compare a later run with them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
