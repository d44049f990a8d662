"""`dxserve-client`: list plugins and classify image files or folders on a dxserve server.

    dxserve-client list-plugins
    dxserve-client classify cells/ one.png --format csv --output results.csv
    dxserve-client classify --watch incoming/      # classify new files as they appear
    dxserve-client classify smear-17/ --specimen-id smear-17     # plus a summary of the specimen
    dxserve-client classify smears/ --specimen-per-folder         # one specimen per sub-folder
    dxserve-client classify cell.png --explain heatmaps/          # write what drove each score

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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .client import DEFAULT_SERVER, Client, DxServeError, Result, Specimen

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
FIELDS = ["path", "specimen_id", "request_id", "label", "indeterminate", "screen_positive", "confidence", "top_label", "model_version",
          "weights_sha256", "rule", "quality_issues", "error_code", "error_message"]


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def watch(folder: Path, poll_s: float, seen: set[Path], idle_exit_s: float | None) -> Iterator[Path]:
    """New image files in `folder` as they appear; a file is taken once its size is stable."""
    sizes: dict[Path, int] = {}
    last_new = time.monotonic()
    while idle_exit_s is None or time.monotonic() - last_new < idle_exit_s:
        for path in image_files([folder]):
            if path in seen:
                continue
            size = path.stat().st_size
            if sizes.get(path) == size:  # unchanged since the last poll: the writer is done
                seen.add(path)
                last_new = time.monotonic()
                yield path
            sizes[path] = size
        time.sleep(poll_s)


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
    return row


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
            print(f"{_short(row['path'], 40):<40} {row['label'] or 'ERROR':<14} {confidence:>6}  {screen:<8} "
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


def write_explanation(folder: Path, index: int, path: Path, result: Result) -> None:
    """The result's heatmap overlay and heatmap as <index>_<name>.overlay.png / .heatmap.png."""
    if result.explanation is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{index:05d}_{path.stem}.overlay.png").write_bytes(result.explanation.overlay_png)
    (folder / f"{index:05d}_{path.stem}.heatmap.png").write_bytes(result.explanation.heatmap_png)


def classify_command(args: argparse.Namespace, client: Client) -> int:
    plugins = {p.name: p for p in client.list_plugins()}
    if args.plugin not in plugins:
        print(f"dxserve-client: unknown plugin {args.plugin!r} (server has: {', '.join(plugins) or 'none'})", file=sys.stderr)
        return 2
    labels = list(plugins[args.plugin].labels)
    if args.watch:
        folder = args.paths[0]
        paths: Iterator[Path] | list[Path] = watch(folder, args.poll_interval, set(), args.idle_exit)
        total = None
    else:
        paths = image_files(args.paths)
        total = len(paths)
    out = args.output.open("w", newline="") if args.output else sys.stdout
    writer = Writer(out, args.format, labels)
    sent: list[Path] = []

    def items():
        for i, path in enumerate(paths):
            sent.append(path)
            try:
                data = path.read_bytes()
            except OSError as error:  # unreadable here: let the server report it like any bad image
                print(f"dxserve-client: {path}: {error}", file=sys.stderr)
                data = b""
            yield (f"{i}:{path.name}", data, specimen_of(path, args.paths, args))

    from tqdm import tqdm

    failed = 0
    specimens: list[Specimen] = []
    progress = tqdm(total=total, unit="img", file=sys.stderr, disable=args.quiet or None)
    try:
        for path_index, result in enumerate(client.classify_stream(items(), plugin=args.plugin, model_version=args.model_version,
                                                                   explain=bool(args.explain), final_summaries=specimens,
                                                                   resume_within_s=args.resume_within)):
            failed += not result.ok
            writer.write(record(sent[path_index], result, labels))
            if args.explain:
                write_explanation(args.explain, path_index, sent[path_index], result)
            progress.update()
    finally:
        progress.close()
        if args.output:
            out.close()
    print(f"{len(sent)} images, {len(sent) - failed} classified, {failed} failed", file=sys.stderr)
    print_specimens(specimens, sys.stderr)
    if args.specimen_output:
        args.specimen_output.write_text(json.dumps([dataclasses.asdict(s) for s in specimens], indent=2) + "\n")
    return 1 if failed else 0


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
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    parser.add_argument("--ca-cert", type=Path, help="PEM root certificate(s) to trust")
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
    classify.add_argument("--watch", action="store_true", help="keep watching the (single) folder for new images")
    classify.add_argument("--poll-interval", type=float, default=0.5, help="seconds between folder scans with --watch")
    classify.add_argument("--idle-exit", type=float, help="with --watch, stop after this many seconds without a new image")
    classify.add_argument("--quiet", action="store_true", help="no progress bar")
    classify.add_argument("--resume-within", type=float, default=60.0, metavar="S",
                          help="when the server stops mid-stream, wait up to S seconds for one (a restart, another "
                               "replica) and resend what was not answered (0: fail instead; default %(default)s)")
    specimen = classify.add_mutually_exclusive_group()
    specimen.add_argument("--specimen-id", default="", help="every image belongs to this specimen: print (standard error) "
                          "and write its summary (decision support, not a diagnosis)")
    specimen.add_argument("--specimen-per-folder", action="store_true", help="each image's folder is its specimen")
    classify.add_argument("--specimen-output", type=Path, help="write the final specimen summaries here as JSON")
    classify.add_argument("--explain", type=Path, metavar="DIR",
                          help="ask for explanations and write each image's heatmap overlay into DIR")
    classify.set_defaults(run=classify_command)

    args = parser.parse_args(argv)
    if getattr(args, "watch", False) and (len(args.paths) != 1 or not args.paths[0].is_dir()):
        parser.error("--watch takes exactly one folder")
    root = args.ca_cert.read_bytes() if args.ca_cert else None
    try:
        with Client(args.server, timeout_s=args.timeout, tls=args.tls, root_certificates=root, token=args.token) as client:
            return args.run(args, client)
    except DxServeError as error:
        print(f"dxserve-client: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`| head`): not an error, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
