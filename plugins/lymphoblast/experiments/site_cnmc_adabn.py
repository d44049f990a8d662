"""Does re-estimating batch-norm statistics (AdaBN, shipped in `adapt`) cost anything where there
is no shift to undo? Onboarding simulated on C-NMC itself, split by patient as issue 33's
held-back lab will be. Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_cnmc_adabn.py [--shared DIR] [--splits 5]

Each split: 8 C-NMC subjects (4 with blasts, 4 normal) are the "site"; 100 of their cells (50
per class) are labelled, and all their cells are its unlabelled images; the statistics are
re-estimated on those cells (`adabn.adapted_backbones`), and a logistic head (`adaptation`'s C)
is fitted on the 100 labelled cells' features, with the parent's statistics and with the site's.
Scored per cell on 1,500 cells of the other subjects. 2.1.0's own head is shown for reference
only: it was trained on every developer subject, these included. Size alone in the same split.

With `--platform`, each split is onboarded through `dxserve site onboard` instead (labels.csv
grouped by subject), and the site version it makes, loaded as the server loads it, scores the
same cells: which classifier its report chose, and what it gives.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

import site_aria as aria
from site_aria import log
from site_aria_adabn import VIEWS, features

HERE = Path(__file__).resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=aria.SHARED)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--platform", action="store_true", help="onboard each split through dxserve site onboard")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or HERE.parent / ("site_cnmc_platform.json" if args.platform else "site_cnmc_adabn.json")

    from dxserve_lymphoblast.adabn import adapted_backbones
    from dxserve_lymphoblast.adaptation import C
    from dxserve_lymphoblast.data import read_manifest
    from dxserve_lymphoblast.export import single_view_function
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version

    root = args.shared / "data" / "cnmc2019"
    rows = read_manifest(root)
    runtime = LymphoblastRuntime(find_version("2.1.0"))
    runtime.load()
    card = runtime.version.extra["card"]
    scales = card["training"]["scales"]
    parent = aria.keras_model("2.1.0")
    base = single_view_function(parent, scales)
    subjects = {label: sorted({r["subject"] for r in rows if r["label"] == label}) for label in ("all", "hem")}
    report = {"splits": []}
    for split in range(args.splits):
        rng = np.random.default_rng(split)
        site = {s for label in ("all", "hem") for s in rng.choice(subjects[label], 4, replace=False)}
        site_rows = [r for r in rows if r["subject"] in site]
        other = [r for r in rows if r["subject"] not in site]
        other = [other[i] for i in rng.choice(len(other), min(1500, len(other)), replace=False)]
        records = {name: np.stack([runtime.prepare(np.asarray(Image.open(root / r["path"]).convert("RGB")))[0] for r in part])
                   for name, part in (("site", site_rows), ("other", other))}
        y_site = np.array([r["label"] == "all" for r in site_rows], int)
        y_other = np.array([r["label"] == "all" for r in other], int)
        labelled = np.concatenate([rng.choice(np.flatnonzero(y_site == k), min(50, (y_site == k).sum()), replace=False) for k in (0, 1)])
        entry = {"site_subjects": sorted(site), "site_cells": len(site_rows), "labelled": len(labelled), "scored_cells": len(other)}
        logits, _ = runtime._run_with_features(records["other"])
        entry["2.1.0 unadapted (trained on these subjects too)"] = aria.auroc(y_other, logits)
        if args.platform:
            entry.update(through_platform(root, site_rows, labelled, records["other"], y_other))
            report["splits"].append(entry)
            log(json.dumps(entry))
            continue
        adapted = single_view_function(parent, scales, adapted_backbones(parent, records["site"]["cell"], scales, VIEWS))
        size_site, size_other = records["site"]["log_diameter"][:, None], records["other"]["log_diameter"][:, None]
        for name, function in (("parent's statistics", base), ("site statistics", adapted)):
            f_site = features(function, records["site"]["cell"]).mean(axis=1)
            f_other = features(function, records["other"]["cell"]).mean(axis=1)
            x_site, x_other = np.column_stack([f_site, size_site]), np.column_stack([f_other, size_other])
            entry[f"site head, {name}"] = aria.auroc(y_other, aria.logistic(x_site[labelled], y_site[labelled], x_other, C))
        entry["size alone"] = aria.auroc(y_other, aria.logistic(size_site[labelled], y_site[labelled], size_other, 1.0))
        report["splits"].append(entry)
        log(json.dumps(entry))
    keys = ("site version", "2.1.0 unadapted (trained on these subjects too)") if args.platform else \
        ("site head, parent's statistics", "site head, site statistics", "size alone", "2.1.0 unadapted (trained on these subjects too)")
    for key in keys:
        values = [e[key] for e in report["splits"]]
        report[key] = {"mean": float(np.mean(values)), "per split": values}
        log(f"{key}: mean {np.mean(values):.3f} ({' '.join(f'{v:.3f}' for v in values)})")
    args.out.write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")


def through_platform(root: Path, site_rows: list[dict], labelled: np.ndarray, scored: np.ndarray, y: np.ndarray) -> dict:
    """`dxserve site onboard` on the site's cells (labelled ones grouped by subject, the rest
    unlabelled), and the site version it makes scoring `scored` as the server would load it."""
    import csv
    import tempfile

    from dxserve import sites
    from dxserve.config import Settings
    from dxserve.onboarding import onboard
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for folder in ("labelled", "unlabelled"):
            (scratch / folder).mkdir()
        for i, row in enumerate(site_rows):  # each cell in its folder, as a link to the data set's file
            (scratch / ("labelled" if i in set(labelled.tolist()) else "unlabelled") / f"{i:05d}.png").symlink_to(root / row["path"])
        table = [("path", "label", "group")] + [(f"labelled/{i:05d}.png", {"all": "lymphoblast", "hem": "normal"}[site_rows[i]["label"]],
                                                 site_rows[i]["subject"]) for i in labelled]
        with (scratch / "labels.csv").open("w", newline="") as f:
            csv.writer(f).writerows(table)
        settings = Settings(sites_dir=scratch / "sites", audit_db="")
        started = time.time()
        done = onboard(settings, "lymphoblast", "2.1.0", "cnmc", scratch / "labels.csv", scratch / "unlabelled", log=log)
        seconds = time.time() - started
        versions, _ = sites.site_versions(settings.sites_dir, "lymphoblast", shipped_versions(), settings.site_acceptance)
        runtime = LymphoblastRuntime(next(v for v in versions if v.version == done.version))
        runtime.load()
        p = np.concatenate([runtime.predict_with_issues(scored[i:i + 24]).probabilities[:, 0] for i in range(0, len(scored), 24)])
    return {"classifier": done.site["head"]["classifier"], "chosen_from": done.site["head"]["chosen_from"],
            "report_auroc": done.site["report"]["auroc"]["site version"], "unmet": done.unmet,
            "onboarding_seconds": round(seconds, 1), "site version": aria.auroc(y, p)}


if __name__ == "__main__":
    main()
