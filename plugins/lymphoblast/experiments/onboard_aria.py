"""Issue 33's targets on the developer part of Aria, through the platform: `dxserve site onboard`
on one block's cells, the site version scored on the other blocks, as a lab would validate it.
Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/onboard_aria.py [--labelled 100 25] [--block 0] [--detector site] [--as-found] [--prevalence]

1. Aria's cells found by smear-field with the site profile (`site_aria.py`), or (`--detector
   site`) by smear-field's own site version, made by `dxserve site onboard --plugin smear-field`
   from the onboarding block's fields (the whole chain through the platform), split by contiguous
   number blocks within each class (5 blocks); block `--block` is the onboarding block.
2. For each size in --labelled: that many cells of the block (half of each class, at random; with
   --as-found, at random in the proportion they come) are
   written as PNG with labels.csv (group: the field's sub-block of --group-size numbers in its
   class, 20 by default: neighbouring fields share a patient, and groups of 5 let a patient's
   cells sit on both sides of the report's folds), the block's other cells as the unlabelled folder, and
   `dxserve site onboard` makes a site version of 2.1.0 into a scratch sites_dir (with --prevalence,
   declaring the share of blasts among the onboarding block's cells, as a lab declares its mix).
3. The site version, loaded as the server loads it, classifies every cell of the other blocks:
   AUROC per cell with its spread over blocks, beside the colour-only and background-only
   baselines fitted on the same labelled cells; confidently wrong (P >= 0.9 for the wrong label),
   of all cells and of those answered without a gate or OOD issue (what a user is told);
   gate and OOD pass rates; PBC lymphocytes called lymphoblast by the site version and by 2.1.0.
4. (`--verify`) The same held-out cells written as PNG with their labels.csv (groups as in 2) and
   scored by `dxserve site verify`, the platform's own verification: its figures beside 3's.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import site_aria as aria

HERE = Path(__file__).resolve()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_onboarding(folder: Path, crops, rows, picked: np.ndarray, unlabelled: np.ndarray,
                     group_size: int) -> tuple[Path, Path]:
    (folder / "labelled").mkdir(parents=True)
    (folder / "unlabelled").mkdir()
    with (folder / "labels.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "group"])
        for i in picked:
            name = f"labelled/{i:05d}.png"
            Image.fromarray(crops[i]).save(folder / name)
            out.writerow([name, "lymphoblast" if rows[i]["label"] == "blast" else "normal",
                          f"{rows[i]['klass']}-{rows[i]['number'] // group_size}"])
    for i in unlabelled:
        Image.fromarray(crops[i]).save(folder / "unlabelled" / f"{i:05d}.png")
    return folder / "labels.csv", folder / "unlabelled"


def served(runtime, crops) -> tuple[np.ndarray, list[list[str]]]:
    """P(lymphoblast) and the issues of each crop, through the runtime as the server calls it."""
    probabilities, issues = [], []
    prepared = [runtime.prepare(c) for c in crops]
    for start in range(0, len(prepared), 12):
        part = prepared[start:start + 12]
        prediction = runtime.predict_with_issues(np.stack([r for r, _ in part]))
        probabilities.append(prediction.probabilities[:, 0])
        issues += [[q.code for q in gate] + [q.code for q in model] for (_, gate), model in zip(part, prediction.issues)]
    return np.concatenate(probabilities), issues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=aria.SHARED)
    parser.add_argument("--labelled", type=int, nargs="+", default=[100, 25])
    parser.add_argument("--as-found", action="store_true",
                        help="label cells of the block at random, in the proportion they come (not half of each class)")
    parser.add_argument("--prevalence", action="store_true",
                        help="onboard with --prevalence: the share of blasts among the onboarding block's cells")
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--detector", choices=("profile", "site"), default="profile")
    parser.add_argument("--group-size", type=int, default=20,
                        help="field numbers a labels.csv group spans (neighbouring fields share a patient)")
    parser.add_argument("--verify", action="store_true", help="also score the held-out cells with `dxserve site verify`")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or HERE.parent / ("onboard_aria.json" if args.detector == "profile" else "onboard_aria_site_detector.json")

    from dxserve import sites
    from dxserve.config import Settings
    from dxserve.onboarding import onboard
    from dxserve_lymphoblast.calibration import expected_calibration_error
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version, shipped_versions

    site_detector, detector_report = (field_site_version(args.shared / "data" / "aria-taleqani", args.block)
                                      if args.detector == "site" else (None, None))
    crops, rows = aria.aria_cells(args.shared / "data" / "aria-taleqani", site_detector)
    found = [r for r in rows if r["cell"] >= 0]
    y = np.array([r["label"] == "blast" for r in found], int)
    block = aria.blocks(found)
    background = np.array([r["background"] for r in found])
    in_block, held = np.flatnonzero(block == args.block), np.flatnonzero(block != args.block)
    log(f"{len(found)} cells; onboarding block {args.block}: {len(in_block)} cells; held out: {len(held)} cells")
    pbc_crops, _ = aria.pbc_cells(args.shared / "data" / "pbc-barcelona")
    parent = LymphoblastRuntime(find_version("2.1.0"))
    parent.load()
    p_parent, issues_parent = served(parent, [crops[i] for i in held])
    p_pbc_parent, pbc_issues_parent = served(parent, pbc_crops)
    report = {"detector": args.detector, "group_size": args.group_size, "detector_site_version": detector_report,
              "fields_with_a_cell": len({r["path"] for r in found}) / len({r["path"] for r in rows}),
              "cells": len(found), "held_out_cells": int(len(held)), "onboarding_block": args.block,
              "parent 2.1.0": {"auroc": aria.auroc(y[held], p_parent),
                               "answered (no issue)": float(np.mean([not i for i in issues_parent])),
                               "pbc_called_lymphoblast": float(np.mean([p >= 0.5 and not i for p, i in zip(p_pbc_parent, pbc_issues_parent)]))}}
    log(f"parent: {report['parent 2.1.0']}")
    for n in args.labelled:
        rng = np.random.default_rng(n)
        picked = rng.choice(in_block, n, replace=False) if args.as_found else \
            np.concatenate([rng.choice(in_block[y[in_block] == k], n // 2, replace=False) for k in (0, 1)])
        unlabelled = np.setdiff1d(in_block, picked)
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            labels, folder = write_onboarding(scratch / "data", crops, found, picked, unlabelled, args.group_size)
            settings = Settings(sites_dir=scratch / "sites", audit_db="")
            started = time.time()
            done = onboard(settings, "lymphoblast", "2.1.0", "taleqani", labels, folder, log=log,
                           prevalence=float(y[in_block].mean()) if args.prevalence else None)
            seconds = time.time() - started
            versions, refused = sites.site_versions(settings.sites_dir, "lymphoblast", shipped_versions(), settings.site_acceptance)
            runtime = LymphoblastRuntime(versions[0])
            runtime.load()
            p, issues = served(runtime, [crops[i] for i in held])
            p_pbc, pbc_issues = served(runtime, pbc_crops)
            verified = verify_held_out(settings, done, scratch / "held-out", crops, found, held, p, args.group_size) \
                if args.verify else None
        colour = aria.logistic(data_colour(crops, picked), y[picked], data_colour(crops, held), 1.0)
        bg = aria.logistic(background[picked], y[picked], background[held], 1.0)
        per_block = {int(b): aria.auroc(y[held][block[held] == b], p[block[held] == b]) for b in np.unique(block[held])}
        wrong = ((p >= 0.9) & (y[held] == 0)) | ((p <= 0.1) & (y[held] == 1))
        answered = np.array([not i for i in issues])  # no gate or OOD issue: the server makes a call
        entry = {"onboarding_seconds": round(seconds, 1), "unmet": done.unmet, "report": done.site["report"],
                 "held_out": {"auroc": aria.auroc(y[held], p), "auroc_per_block": per_block,
                              "colour_alone_auroc": aria.auroc(y[held], colour), "background_alone_auroc": aria.auroc(y[held], bg),
                              "confidently_wrong": float(wrong.mean()),
                              "confidently_wrong_and_answered": float((wrong & answered).mean()),
                              "auroc_answered": aria.auroc(y[held][answered], p[answered]),
                              "ece": expected_calibration_error(p, y[held]),
                              "ece_answered": expected_calibration_error(p[answered], y[held][answered]),
                              "answered (no issue)": float(np.mean([not i for i in issues])),
                              "pbc_called_lymphoblast": float(np.mean([q >= 0.5 and not i for q, i in zip(p_pbc, pbc_issues)])),
                              "pbc_answered": float(np.mean([not i for i in pbc_issues]))}}
        if verified is not None:
            entry["verification"] = verified
            log(f"{n} labelled, `site verify`: {verified['figures']['site version']['acceptance']}, "
                f"answered {verified['figures']['site version']['answered']:.3f}; unmet: {verified['unmet']}")
        report[f"{n} labelled"] = entry
        log(f"{n} labelled: {json.dumps(entry['held_out'])}; onboarding {seconds:.0f} s; unmet: {done.unmet}")
    args.out.write_text(json.dumps(report, indent=1, default=float))
    log(f"wrote {args.out}")


def verify_held_out(settings, onboarded, folder: Path, crops, rows, held: np.ndarray, p: np.ndarray, group_size: int) -> dict:
    """`dxserve site verify` on the held-out cells (written as PNG, labels.csv grouped as onboarding's),
    less those of a group the labelled cells came from: a group of `group_size` field numbers can
    straddle the onboarding block's edge, and `verify` refuses a group it was fitted on. Beside it,
    this script's own AUROC (`served`, `p`) on the same cells."""
    from dxserve.verification import verify

    group = {i: f"{rows[i]['klass']}-{rows[i]['number'] // group_size}" for i in held}
    kept = np.array([group[i] not in set(onboarded.site["labelled_groups"]) for i in held])
    (folder / "cells").mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "group"])
        for i in held[kept]:
            name = f"cells/{i:05d}.png"
            Image.fromarray(crops[i]).save(folder / name)
            out.writerow([name, "lymphoblast" if rows[i]["label"] == "blast" else "normal", group[i]])
    started = time.time()
    done = verify(settings, "lymphoblast", onboarded.version, folder / "labels.csv", log=log)
    y = np.array([rows[i]["label"] == "blast" for i in held[kept]], int)
    return {"seconds": round(time.time() - started, 1), "unmet": done.unmet, "left_out_cells": int((~kept).sum()),
            "served_auroc_same_cells": aria.auroc(y, p[kept]),
            **{k: v for k, v in done.verification.items() if k != "rows"}}


def field_site_version(root: Path, block: int):
    """smear-field's site version for Aria, onboarded (`dxserve site onboard --plugin smear-field`)
    on the fields of `block`: every one listed as showing a white cell, grouped by class."""
    import re

    from dxserve.config import Settings
    from dxserve.onboarding import onboard
    from dxserve_smear_field.detect import Parameters

    fields = list(csv.DictReader(open(root / "manifest.csv")))
    numbers = {}
    for r in fields:
        numbers.setdefault(r["original_class"], []).append(int(re.search(r"(\d+)\.jpg$", r["path"]).group(1)))
    scratch = Path(tempfile.mkdtemp(prefix="aria-fields-"))
    (scratch / "fields").mkdir()
    with (scratch / "labels.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "group"])
        for r in fields:
            ordered = sorted(numbers[r["original_class"]])
            number = int(re.search(r"(\d+)\.jpg$", r["path"]).group(1))
            if ordered.index(number) * aria.BLOCKS // len(ordered) == block:
                name = f"fields/{Path(r['path']).name}"
                (scratch / name).symlink_to(root / r["path"])
                out.writerow([name, "classified", r["original_class"]])
    settings = Settings(sites_dir=scratch / "sites", audit_db="")
    done = onboard(settings, "smear-field", "1.0.0", "taleqani", scratch / "labels.csv", scratch / "fields", log=log)
    log(f"smear-field site version {done.version}: {json.dumps(done.site['report']['measured'])}")
    return Parameters.load(done.folder / done.site["weights"]["file"]), {"version": done.version, **done.site["report"]}


def data_colour(crops, index) -> np.ndarray:
    """Mean colour of each crop's cell pixels (what the model's input shows of its colour)."""
    out = []
    for i in index:
        c = crops[i]
        inside = c.max(axis=2) > 12
        out.append(c[inside].mean(axis=0) if inside.any() else np.zeros(3))
    return np.array(out)


if __name__ == "__main__":
    main()
