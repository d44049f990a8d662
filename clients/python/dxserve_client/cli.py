"""`dxserve-client`: list plugins and classify image files or folders on a dxserve server.

    dxserve-client list-plugins
    dxserve-client classify cells/ one.png --format csv --output results.csv
    dxserve-client classify --watch incoming/      # classify new files as they appear
    dxserve-client classify smear-17/ --specimen-id smear-17     # plus a summary of the specimen
    dxserve-client classify smears/ --specimen-per-folder         # one specimen per sub-folder
    dxserve-client classify cell.png --explain heatmaps/          # write what drove each score
    dxserve-client classify smear-17/ --specimen-id smear-17 --fhir bundle.json --hl7 oru.hl7   # for the LIS / EHR
    dxserve-client classify fields/ --plugin smear-field --overlay boxes/   # one row per cell found in each field

Exit status: 0 when every image was classified, 1 when any item failed, 2 on usage or
connection errors.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .client import DEFAULT_SERVER, Client, DxServeError, Result, Specimen, image_files, retry_delay_s

FIELDS = ["path", "specimen_id", "request_id", "label", "indeterminate", "screen_positive", "confidence", "top_label", "model_version",
          "weights_sha256", "rule", "quality_issues", "error_code", "error_message", "object", "box"]


def record(path: Path, result: Result, labels: list[str]) -> dict:
    row = {
        "path": str(path), "specimen_id": result.specimen.specimen_id if result.specimen else "", "request_id": result.request_id, "label": result.decision,
        "indeterminate": result.indeterminate if result.ok else "",
        # A flag for review at the plugin's high-sensitivity threshold, apart from the call.
        "screen_positive": result.screen_positive if result.ok else "",
        # The probability of the decided label; none when the plugin declined to decide.
        "confidence": round(result.probabilities[result.decision], 6) if result.decision in result.probabilities else "",
        "top_label": result.top_label, "model_version": result.model_version, "weights_sha256": result.weights_sha256,
        "rule": result.rule,
        # Codes of the input quality checks the image failed (then the label is indeterminate).
        "quality_issues": "|".join(code for code, _ in result.quality_issues), "error_code": result.error_code, "error_message": result.error_message,
    }
    row.update({f"p_{label}": round(result.probabilities[label], 6) if label in result.probabilities else "" for label in labels})
    row.update(object="", box="")
    return row


def records(path: Path, result: Result, labels: list[str]) -> list[dict]:
    """One record per image; for a field plugin's image, one per object found in it (with its
    index and box "x,y,width,height"), or the field's own record when it found none or failed."""
    if not result.objects:
        return [record(path, result, labels)]
    rows = []
    for found in result.objects:
        row = record(path, found.result, labels)
        if not row["specimen_id"]:
            row["specimen_id"] = result.specimen.specimen_id if result.specimen else ""
        row.update(object=found.index, box=",".join(map(str, found.box)))
        rows.append(row)
    return rows


#: Box colours of a field's overlay, by the object's result.
OVERLAY_COLOURS = {"indeterminate": (255, 200, 0), "error": (128, 128, 128)}
LABEL_COLOURS = [("red", (220, 30, 30)), ("green", (30, 160, 60)), ("blue", (40, 90, 220)), ("magenta", (200, 0, 200))]


def write_overlay(folder: Path, index: int, path: Path, data: bytes, result: Result, labels: list[str]) -> None:
    """<index>_<name>.objects.png: the field with each found object's box coloured by its result
    (each label its colour, indeterminate yellow, failed grey) and a legend."""
    if result.field is None:
        return
    import io

    from PIL import Image, ImageDraw

    field = Image.open(io.BytesIO(data)).convert("RGB")
    draw = ImageDraw.Draw(field)
    named = {label: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, label in enumerate(labels)}
    colours = {label: rgb for label, (_, rgb) in named.items()}
    for found in result.objects:
        key = "error" if not found.result.ok else found.result.decision
        x, y, w, h = found.box
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colours.get(key) or OVERLAY_COLOURS.get(key, (0, 0, 0)), width=3)
        draw.text((x + 4, y + 4), f"{found.index}: {key}", fill=(0, 0, 0))
    legend = ", ".join([*(f"{label} ({name})" for label, (name, _) in named.items()), "indeterminate (yellow)", "failed (grey)"])
    draw.text((4, field.height - 14), f"{result.reason[:90]} | colours: {legend}", fill=(0, 0, 0))
    field.save(folder / f"{index:05d}_{path.stem}.objects.png")


class Writer:
    """Writes records as a table, CSV or JSON lines."""

    def __init__(self, out: TextIO, fmt: str, labels: list[str]):
        self.out, self.fmt, self.labels = out, fmt, labels
        self.fields = FIELDS[:7] + [f"p_{label}" for label in labels] + FIELDS[7:]
        if fmt == "csv":
            self.csv = csv.DictWriter(out, self.fields)
            self.csv.writeheader()
        elif fmt == "table":
            print(f"{'path':<40} {'label':<14} {'conf':>6}  {'screen':<8} {'model':<8} detail", file=out)

    def write(self, row: dict) -> None:
        if self.fmt == "csv":
            self.csv.writerow(row)
        elif self.fmt == "jsonl":
            print(json.dumps({k: row[k] for k in self.fields}), file=self.out)
        else:
            detail = (f"{row['error_code']}: {row['error_message']}" if row["error_code"]
                      else f"quality gate: {row['quality_issues']}" if row["quality_issues"] else f"sha256 {row['weights_sha256'][:12]}")
            confidence = f"{row['confidence']:.3f}" if row["confidence"] != "" else ""
            screen = "positive" if row["screen_positive"] is True else ""
            where = row["path"] + (f" #{row['object']} at {row['box']}" if row["object"] != "" else "")
            print(f"{_short(where, 40):<40} {row['label'] or 'ERROR':<14} {confidence:>6}  {screen:<8} "
                  f"{row['model_version']:<8} {detail}", file=self.out)
        self.out.flush()


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def specimen_of(path: Path, roots: list[Path], args: argparse.Namespace) -> str:
    """The specimen an image belongs to: --specimen-id, or with --specimen-per-folder its
    folder (relative to the folder given on the command line)."""
    if not args.specimen_per_folder:
        return args.specimen_id
    for root in roots:
        if root.is_dir() and path.is_relative_to(root):
            return str(path.parent.relative_to(root.parent))
    return str(path.parent)


def print_specimens(specimens: list[Specimen], out: TextIO) -> None:
    """The final per-specimen summaries, for people."""
    for s in specimens:
        fractions = ", ".join(f"{label} {count} ({fraction:.1%}, 95% CI {low:.1%}-{high:.1%})"
                              for label, (count, fraction, low, high) in s.labels.items())
        print(f"specimen {s.specimen_id} ({s.plugin} {s.model_version}): {s.cells_seen} cells, {s.cells_passed_gate} passed "
              f"the quality gate, {s.cells_failed} failed, {s.indeterminate} indeterminate; called: {fractions or 'none'}", file=out)
        if s.call:
            print(f"  specimen call: {s.call} - {s.call_reason}\n  rule: {s.rule}\n  decision support for a person "
                  "reviewing the specimen, not a diagnosis", file=out)


def run_folder(parent: Path) -> Path:
    """A new folder for this run's explanation files under `parent`: runs never overwrite each other."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1, 1000):
        folder = parent / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder under {parent}")


def write_explanation(folder: Path, index: int, path: Path, result: Result) -> None:
    """<index>_<name>.<label>.overlay.png (the overlay with a legend: which label, how, the colour
    scale) and <index>_<name>.<label>.heatmap.png (the 8-bit heatmap itself)."""
    if result.explanation is None:
        return
    from .explanations import with_legend

    e = result.explanation
    stem = f"{index:05d}_{path.stem}.{e.label}"
    p = result.probabilities.get(e.label)
    caption = f"explains: {e.label}" + (f" (P = {p:.2f})" if p is not None else "") + f"; {e.method}"
    (folder / f"{stem}.overlay.png").write_bytes(with_legend(e.overlay_png, caption))
    (folder / f"{stem}.heatmap.png").write_bytes(e.heatmap_png)


def retry_after(result: Result) -> float | None:
    """Seconds the server asked to wait before trying this item again (RetryInfo on UNAVAILABLE or
    RESOURCE_EXHAUSTED: a plugin still loading, a full queue); None when it is not worth a retry."""
    if result.error_code not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        return None
    return retry_delay_s(result.error_details)


def unreadable(path: Path, error: OSError) -> Result:
    """A local record for a file that could not be read: named as such, never sent."""
    code = "NOT_FOUND" if isinstance(error, FileNotFoundError) else "PERMISSION_DENIED" if isinstance(error, PermissionError) else "UNKNOWN"
    what = "file not found" if code == "NOT_FOUND" else "file cannot be read"
    return Result(request_id="", error_code=code, error_message=f"{what}: {path} ({error.strerror or error}); not sent")


class Feed:
    """The files a classify run sends, in order: a list, or a FolderWatch; failed items the server
    asked to retry (and, when watching, files still being written) are put back, within `--wait`."""

    def __init__(self, args: argparse.Namespace):
        from .watching import STATE_FILE, FolderWatch, SentLog

        if args.watch:
            folder = args.paths[0]
            log = None if args.no_state else SentLog(args.state or folder / STATE_FILE, folder)
            self.watch: FolderWatch | None = FolderWatch(folder, args.poll_interval, args.idle_exit, log)
            self.source: Iterator = iter(self.watch)
            self.total = None
        else:
            self.watch = None
            files = image_files(args.paths)
            self.source = iter([(f, None) for f in files])
            self.total = len(files)
        self.retries: list[tuple[float, Path, tuple | None]] = []  # (when, path, signature): lists only
        self.attempts: dict[Path, int] = {}
        self.wait_s = args.wait
        self.started = time.monotonic()
        self.in_flight = 0
        self.cond = threading.Condition()

    def __iter__(self) -> Iterator[tuple[Path, tuple | None]]:
        while True:
            try:
                item = next(self.source)
            except StopIteration:
                item = self._next_retry()
                if item is None:
                    return
            with self.cond:
                self.in_flight += 1
            yield item

    def _next_retry(self):
        """For a list: wait for answers in flight, then for the earliest retry due; None when done."""
        with self.cond:
            while True:
                if self.retries:
                    self.retries.sort(key=lambda r: r[0])
                    when, path, sig = self.retries[0]
                    if time.monotonic() >= when:
                        self.retries.pop(0)
                        return path, sig
                    self.cond.wait(when - time.monotonic())
                elif self.in_flight:
                    self.cond.wait(1.0)
                else:
                    return None

    def done(self, path: Path, sig, retry_in_s: float | None = None) -> bool:
        """One answer; with `retry_in_s`, try again then if --wait allows (True: it will be)."""
        self.attempts[path] = self.attempts.get(path, 0) + 1
        again = retry_in_s is not None and time.monotonic() + retry_in_s - self.started <= self.wait_s and self.attempts[path] <= 20
        with self.cond:
            self.in_flight -= 1
            if again and self.watch is None:
                self.retries.append((time.monotonic() + retry_in_s, path, sig))
            self.cond.notify_all()
        if self.watch is not None and sig is not None:
            if again:
                self.watch.again(path, sig, retry_in_s)
            else:
                self.watch.answered(path, sig)
        return again

    def recheck(self, path: Path, sig, fail) -> None:
        """Watching: `path` failed to decode, maybe half-written; `FolderWatch.recheck` decides."""
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()
        self.watch.recheck(path, sig, max(4 * self.watch.settle_s, 2.0), fail)


def classify_command(args: argparse.Namespace, client: Client) -> int:
    waiting = lambda: print(f"dxserve-client: waiting for plugin {args.plugin!r} to load (up to {args.wait:g} s, --wait)",  # noqa: E731
                            file=sys.stderr)
    try:
        info = client.wait_until_loaded(args.plugin, args.wait, on_wait=waiting)
        labels = list(info.labels)
        if info.objects_plugin:  # a field plugin: the rows are its objects, with their plugin's labels
            labels = list(client.wait_until_loaded(info.objects_plugin, args.wait, on_wait=waiting).labels)
    except (LookupError, RuntimeError, TimeoutError) as problem:
        print(f"dxserve-client: {problem}" + (" (--wait)" if isinstance(problem, TimeoutError) else ""), file=sys.stderr)
        return 2
    if (args.fhir or args.hl7) and (problem := reports_unavailable(args)):
        print(f"dxserve-client: {problem}", file=sys.stderr)
        return 2
    feed = Feed(args)
    out = args.output.open("w", newline="") if args.output else sys.stdout
    writer = Writer(out, args.format, labels)
    explain_dir = run_folder(args.explain) if args.explain else None
    overlay_dir = run_folder(args.overlay) if args.overlay else None
    sent_data: dict[str, bytes] = {}  # --overlay: each field's file until its result is drawn
    lock = threading.Lock()
    sent: dict[str, tuple[Path, tuple | None]] = {}
    counts = {"images": 0, "failed": 0}
    answered: list[Result] = []  # for --fhir / --hl7

    def finish(path: Path, result: Result) -> None:
        with lock:
            if args.fhir or args.hl7:
                answered.append(result)
            counts["images"] += 1
            counts["failed"] += not result.ok
            for row in records(path, result, labels):
                writer.write(row)
            data = sent_data.pop(result.request_id, b"")  # kept for the overlay until its result is in
            if overlay_dir is not None and result.ok:
                write_overlay(overlay_dir, counts["images"] - 1, path, data, result, labels)
            if explain_dir is not None:
                write_explanation(explain_dir, counts["images"] - 1, path, result)
            progress.update()

    def items():
        for n, (path, sig) in enumerate(feed):
            try:
                data = path.read_bytes()
            except OSError as error:  # named as what it is, not sent as an empty image
                feed.done(path, sig)
                finish(path, unreadable(path, error))
                continue
            request_id = f"{n}:{path.name}"
            sent[request_id] = (path, sig)
            if overlay_dir is not None:
                sent_data[request_id] = data
            yield (request_id, data, specimen_of(path, args.paths, args))

    from tqdm import tqdm

    specimens: list[Specimen] = []
    progress = tqdm(total=feed.total, unit="img", file=sys.stderr, disable=args.quiet or None)
    try:
        for result in client.classify_stream(items(), plugin=args.plugin, model_version=args.model_version,
                                             explain=bool(args.explain), final_summaries=specimens,
                                             resume_within_s=args.resume_within, microns_per_pixel=args.microns_per_pixel):
            path, sig = sent.pop(result.request_id)
            if result.error_code == "INVALID_ARGUMENT" and feed.watch is not None:
                feed.recheck(path, sig, lambda path=path, result=result: finish(path, result))  # half-written when read?
            elif not feed.done(path, sig, retry_after(result)):
                finish(path, result)
    finally:
        progress.close()
        if args.output:
            out.close()
    print(f"{counts['images']} images, {counts['images'] - counts['failed']} classified, {counts['failed']} failed", file=sys.stderr)
    for what, folder in (("explanations", explain_dir), ("overlays", overlay_dir)):
        if folder is not None:  # where the pictures went: a new folder per run
            print(f"{what}: {folder}/ ({sum(1 for _ in folder.iterdir())} files)", file=sys.stderr)
    print_specimens(specimens, sys.stderr)
    if args.specimen_output:
        args.specimen_output.write_text(json.dumps([dataclasses.asdict(s) for s in specimens], indent=2) + "\n")
    if args.fhir or args.hl7:
        write_reports(args, client, answered, specimens)
    return 1 if counts["failed"] else 0


def reports_unavailable(args: argparse.Namespace) -> str:
    """Why --fhir / --hl7 cannot be made ("" when they can): one specimen, and the libraries."""
    if not args.specimen_id:
        return "--fhir and --hl7 report one specimen: give --specimen-id"
    try:
        import fhir.resources  # noqa: F401
        import hl7apy  # noqa: F401
    except ImportError:
        return "--fhir and --hl7 need fhir.resources and hl7apy: pip install 'dxserve-client[hl7]'"
    return ""


def write_reports(args: argparse.Namespace, client: Client, results: list[Result], specimens: list[Specimen]) -> None:
    """The specimen's FHIR Bundle (--fhir) and HL7 v2 ORU^R01 (--hl7)."""
    from .fhir import to_fhir
    from .hl7v2 import to_oru

    summary = next((s for s in specimens if s.specimen_id == args.specimen_id), None)
    if summary is None:
        print(f"dxserve-client: no summary of specimen {args.specimen_id!r} came back; no report written", file=sys.stderr)
        return
    plugin = next((p for p in client.list_plugins() if p.name == summary.plugin), None)
    card = next((v.model_card for v in plugin.model_versions if v.version == summary.model_version), "") if plugin else ""
    if args.fhir:
        bundle = to_fhir(results, summary, patient=f"Patient/{args.patient}" if args.patient else "",
                         per_cell=args.fhir_per_cell, model_card=card)
        args.fhir.write_text(bundle.model_dump_json(indent=2) + "\n")
        print(f"FHIR R4 Bundle ({len(bundle.entry)} resources) written to {args.fhir}", file=sys.stderr)
    if args.hl7:
        args.hl7.write_bytes(to_oru(summary, results, patient_id=args.patient).to_er7().encode() + b"\r")
        print(f"HL7 v2.5.1 ORU^R01 written to {args.hl7}", file=sys.stderr)


def list_plugins_command(args: argparse.Namespace, client: Client) -> int:
    plugins = client.list_plugins()
    if args.format == "json":
        from google.protobuf.json_format import MessageToDict

        print(json.dumps([MessageToDict(p, always_print_fields_with_no_presence=True) for p in plugins], indent=2))
        return 0
    for p in plugins:
        state = p.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[p.state].name.removeprefix("PLUGIN_STATE_")
        print(f"{p.name} {p.version} [{state}] labels={','.join(p.labels)} default={p.default_model_version}")
        if p.state_reason:
            print(f"  reason: {p.state_reason}")
        for v in p.model_versions:
            version_state = v.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[v.state].name
            checks = ",".join(v.safety_checks) or "none"
            print(f"  model {v.version} [{version_state.removeprefix('VERSION_STATE_')}] sha256={v.weights_sha256} "
                  f"safety_checks={checks}" + (f"\n    reason: {v.state_reason}" if v.state_reason else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dxserve-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT (default %(default)s)")
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --tls-ca)")
    parser.add_argument("--tls-ca", "--ca-cert", dest="tls_ca", type=Path, help="PEM root certificate(s) to trust; implies --tls")
    parser.add_argument("--client-cert", type=Path, help="PEM client certificate chain for mutual TLS (with --client-key)")
    parser.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for unary calls")
    parser.add_argument("--token", default=os.environ.get("DXSERVE_TOKEN"),
                        help="bearer token for a server with callers (default: $DXSERVE_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list-plugins", help="the server's plugins and model versions")
    listing.add_argument("--format", choices=["text", "json"], default="text")
    listing.set_defaults(run=list_plugins_command)

    classify = sub.add_parser("classify", help="stream image files or folders and print one record per image")
    classify.add_argument("paths", nargs="+", type=Path)
    classify.add_argument("--plugin", default="lymphoblast")
    classify.add_argument("--model-version", default="", help="default: the plugin's default version")
    classify.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    classify.add_argument("--output", type=Path, help="write records here instead of standard output")
    classify.add_argument("--watch", action="store_true", help="keep watching the (single) folder: classify each image "
                          "once it is complete (closed by its writer, moved in, or unchanged for --poll-interval)")
    classify.add_argument("--poll-interval", type=float, default=0.5, metavar="S", help="with --watch, seconds a file must "
                          "stay unchanged to count as complete when no close event is seen (default %(default)s)")
    classify.add_argument("--idle-exit", type=float, help="with --watch, stop after this many seconds without a new image")
    classify.add_argument("--state", type=Path, help="with --watch, the file that remembers what was answered, so a restart "
                          "sends nothing twice (default: FOLDER/.dxserve-client-sent.jsonl)")
    classify.add_argument("--no-state", action="store_true", help="with --watch, keep no state file (a restart sends all again)")
    classify.add_argument("--wait", type=float, default=120.0, metavar="S", help="wait up to S seconds for a plugin that is "
                          "loading, and retry items the server asks to retry later (RetryInfo) within S (default %(default)s)")
    classify.add_argument("--quiet", action="store_true", help="no progress bar")
    classify.add_argument("--resume-within", type=float, default=60.0, metavar="S",
                          help="when the server stops mid-stream, wait up to S seconds for one (a restart, another "
                               "replica) and resend what was not answered (0: fail instead; default %(default)s)")
    specimen = classify.add_mutually_exclusive_group()
    specimen.add_argument("--specimen-id", default="", help="every image belongs to this specimen: print (standard error) "
                          "and write its summary (decision support, not a diagnosis)")
    specimen.add_argument("--specimen-per-folder", action="store_true", help="each image's folder is its specimen")
    classify.add_argument("--specimen-output", type=Path, help="write the final specimen summaries here as JSON")
    classify.add_argument("--microns-per-pixel", type=float, default=0.0, metavar="UM", help="the images' pixel size, "
                          "when the acquisition software knows it (field plugins; 0: they estimate it)")
    classify.add_argument("--overlay", type=Path, metavar="DIR", help="field plugins: write each field with its found "
                          "objects' boxes coloured by their results to DIR/run-<time>/")
    classify.add_argument("--fhir", type=Path, metavar="FILE", help="with --specimen-id: write the specimen's results as an "
                          "HL7 FHIR R4 transaction Bundle (DiagnosticReport, Observations, Device, AI Provenance)")
    classify.add_argument("--fhir-per-cell", action="store_true", help="with --fhir: one Observation per cell too")
    classify.add_argument("--hl7", type=Path, metavar="FILE", help="with --specimen-id: write an HL7 v2.5.1 ORU^R01 message")
    classify.add_argument("--patient", default="", metavar="ID", help="the patient's id for --fhir (subject Patient/ID) "
                          "and --hl7 (PID-3); none: no subject")
    classify.add_argument("--explain", type=Path, metavar="DIR",
                          help="ask for explanations and write each image's heatmap overlay, with a legend naming the "
                               "explained label, into a new DIR/run-<time>/ folder")
    classify.set_defaults(run=classify_command)

    args = parser.parse_args(argv)
    if getattr(args, "watch", False) and (len(args.paths) != 1 or not args.paths[0].is_dir()):
        parser.error("--watch takes exactly one folder")
    if bool(args.client_cert) != bool(args.client_key):
        parser.error("--client-cert and --client-key go together")
    try:
        root = args.tls_ca.read_bytes() if args.tls_ca else None
        pair = (args.client_key.read_bytes(), args.client_cert.read_bytes()) if args.client_cert else None
    except OSError as error:
        parser.error(f"cannot read {error.filename}: {error.strerror}")
    try:
        with Client(args.server, timeout_s=args.timeout, tls=args.tls, root_certificates=root, client_certificate=pair,
                    token=args.token) as client:
            return args.run(args, client)
    except DxServeError as error:
        print(f"dxserve-client: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`| head`): not an error, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
