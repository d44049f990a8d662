"""Issue 33: can a second lab (Aria / Taleqani) get answers from 2.1.0's frozen features?
Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_aria.py [--shared DIR] [--cache DIR]

1. Cells: every Aria field's white cells, found by smear-field's detector with a site profile
   (a fixed 0.47 um/px, clumps and edge cells left out, the scale bar masked), and every PBC
   lymphocyte (the detected cell nearest the crop's centre), on the classifier's black canvas.
2. Each cell as it is and colour-standardised (Reinhard: per-channel mean and spread in CIELAB
   of the cell's pixels mapped to the C-NMC developer cells'), through 2.1.0's served graph:
   logit, 768 CNN features, OOD distance, the gate's colour distance.
3. Splits by contiguous number blocks: each original class's files cut into 5 blocks in number
   order; split b trains on block b of every class and scores the other four. Learning curve at
   10 / 25 / 50 / 100 labelled cells of block b (balanced, 5 draws); AUROC per cell on the other
   blocks, beside 2.1.0 unadapted, its features re-standardised on the site's unlabelled cells,
   size alone, the cell's colour alone (as the model sees it) and the field's background alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).resolve()
SHARED = HERE.parents[3].parent / "shared"
PBC_UM_PER_PX = 0.083  # red cells measured in the crops where enough show (12 px/um)
ARIA_UM_PER_PX = 0.47  # red cells about 16 px across at 7.5 um (the 224 px fields are downscaled 100x captures)
SITE_DETECTOR = {"skip_clumps": True, "drop_border_cells": True, "min_smear_hue_fraction": 0.0, "nucleus_min_saturation_floor": 0.2}
BLOCKS = 5
SIZES = (10, 25, 50, 100)
DRAWS = 5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def detector(overrides: dict):
    from dxserve_smear_field.detect import Parameters
    from dxserve_smear_field.plugin import DETECTORS

    return Parameters.load(DETECTORS / "1.0.0" / "parameters.json").with_overrides(overrides)


def mask_scale_bar(rgb: np.ndarray) -> np.ndarray:
    """Aria's scale-bar label (lower right) painted over with the field's brightest tone."""
    out = rgb.copy()
    h, w = rgb.shape[:2]
    background = np.percentile(rgb.reshape(-1, 3), 90, axis=0)
    out[int(h * 0.88):, int(w * 0.78):] = background.astype(np.uint8)
    return out


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Mean colour of the field's brightest fifth (plasma and glass, no cells)."""
    grey = rgb.mean(axis=2)
    return rgb[grey >= np.percentile(grey, 80)].mean(axis=0)


def aria_cells(root: Path, site=None) -> tuple[list[np.ndarray], list[dict]]:
    """Every field's cells: by this script's profile, or by `site` (a smear-field site version's
    parameters, which mask the scale bar and carry the scale themselves)."""
    from dxserve_smear_field.detect import find

    p = site or detector(SITE_DETECTOR)
    crops, rows = [], []
    fields = list(csv.DictReader(open(root / "manifest.csv")))
    for r in fields:
        rgb = np.asarray(Image.open(root / r["path"]).convert("RGB"))
        cells, issues = find(rgb, site) if site else find(mask_scale_bar(rgb), p, ARIA_UM_PER_PX)
        number = int(re.search(r"(\d+)\.jpg$", r["path"]).group(1))
        for i, cell in enumerate(cells):
            crops.append(cell.crop)
            rows.append({"path": r["path"], "label": r["label"], "klass": r["original_class"], "number": number, "cell": i,
                         "background": background_colour(rgb).tolist()})
        if not cells:
            rows.append({"path": r["path"], "label": r["label"], "klass": r["original_class"], "number": number, "cell": -1,
                         "issues": [i.code for i in issues]})
    return crops, rows


def pbc_cells(root: Path) -> tuple[list[np.ndarray], list[dict]]:
    from dxserve_smear_field.detect import find

    p = detector({"skip_clumps": True})
    crops, rows = [], []
    for r in csv.DictReader(open(root / "manifest.csv")):
        rgb = np.asarray(Image.open(root / r["path"]).convert("RGB"))
        cells, issues = find(rgb, p, PBC_UM_PER_PX)
        if not cells:
            rows.append({"path": r["path"], "cell": -1, "issues": [i.code for i in issues]})
            continue
        h, w = rgb.shape[:2]
        centre = min(cells, key=lambda c: (c.box[0] + c.box[2] / 2 - w / 2) ** 2 + (c.box[1] + c.box[3] / 2 - h / 2) ** 2)
        crops.append(centre.crop)
        rows.append({"path": r["path"], "cell": 0, "background": background_colour(rgb).tolist()})
    return crops, rows


def rgb2lab(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels (n, 3) -> CIELAB (n, 3) float32 (OpenCV's, D65)."""
    import cv2

    return cv2.cvtColor(pixels.reshape(-1, 1, 3).astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3)


def lab2rgb(lab: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(lab.reshape(-1, 1, 3).astype(np.float32), cv2.COLOR_LAB2RGB).reshape(-1, 3)


def lab_stats(crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per CIELAB channel of the cells' pixels (all cells pooled)."""
    pixels = np.concatenate([rgb2lab(c[c.max(axis=2) > 12]) for c in crops])
    return pixels.mean(axis=0), pixels.std(axis=0)


def reinhard(crop: np.ndarray, target: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The cell's CIELAB channels shifted and scaled to `target`'s mean and spread; background kept black."""
    mask = crop.max(axis=2) > 12
    if mask.sum() < 16:
        return crop
    lab = rgb2lab(crop[mask])
    lab = (lab - lab.mean(axis=0)) / np.maximum(lab.std(axis=0), 1e-3) * target[1] + target[0]
    out = np.zeros_like(crop)
    out[mask] = np.clip(lab2rgb(lab) * 255 + 0.5, 13, 255).astype(np.uint8)  # stays above the black background
    return out


def served(crops: list[np.ndarray], version: str = "2.1.0") -> dict[str, np.ndarray]:
    """2.1.0's logit, features, OOD distance and the gate's colour distance and issues for each crop."""
    from dxserve_lymphoblast.gate import measure
    from dxserve_lymphoblast.ood import distance
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version

    runtime = LymphoblastRuntime(find_version(version))
    runtime.load()
    gate = runtime.version.extra["card"]["quality_gate"]
    records, colour, mean_rgb, log_d, issues = [], [], [], [], []
    for crop in crops:
        record, quality = runtime.prepare(crop)
        records.append(record)
        issues.append(",".join(q.code for q in quality))
        m = measure(crop, gate["colour"])
        colour.append(m["colour_distance"])
        log_d.append(m["log_diameter"])
        cell = record["cell"]
        inside = cell.max(axis=2) > 12
        mean_rgb.append(cell[inside].mean(axis=0) if inside.any() else np.zeros(3))
    logits, features = [], []
    batch = np.stack(records)
    for start in range(0, len(batch), 32):
        lo, f = runtime._run(batch[start:start + 32])
        logits.append(lo)
        features.append(f)
    features = np.concatenate(features)
    return {"logit": np.concatenate(logits), "features": features, "ood": distance(features, runtime.ood),
            "colour_distance": np.array(colour), "mean_rgb": np.array(mean_rgb), "log_diameter": np.array(log_d),
            "gate_issues": np.array(issues)}


def head_with_site_stats(version: str, features: np.ndarray, log_d: np.ndarray, site_mean, site_std) -> np.ndarray:
    """2.1.0's own head on features re-standardised to the developer set's statistics by the
    site's unlabelled cells (what re-estimating batch-norm statistics does for a frozen net)."""
    head = keras_model(version).get_layer("head")
    scaling = [layer for layer in head.layers if "feature_scaling" in layer.name] or \
              [layer for sub in head.layers if hasattr(sub, "layers") for layer in sub.layers if "feature_scaling" in layer.name]
    dev_mean, dev_var = (np.asarray(scaling[0].mean).ravel(), np.asarray(scaling[0].variance).ravel())
    adjusted = (features - site_mean) / np.maximum(site_std, 1e-6) * np.sqrt(dev_var) + dev_mean
    return np.asarray(head({"features": adjusted.astype(np.float32), "log_diameter": log_d[:, None].astype(np.float32)})).ravel()


def keras_model(version: str):
    """The shipped version's Keras model (its TensorFlow form)."""
    import keras

    from dxserve_lymphoblast import model as _registers_custom_layers  # noqa: F401
    from dxserve_lymphoblast.plugin import shipped_versions

    return keras.models.load_model(next(v for v in shipped_versions(runtime="tensorflow") if v.version == version).weights,
                                   compile=False)


def blocks(rows: list[dict]) -> np.ndarray:
    """Block 0..BLOCKS-1 of each cell: its field's number's position among its class's fields."""
    out = np.zeros(len(rows), int)
    for klass in {r["klass"] for r in rows}:
        numbers = sorted({r["number"] for r in rows if r["klass"] == klass})
        edges = {n: i * BLOCKS // len(numbers) for i, n in enumerate(numbers)}
        for i, r in enumerate(rows):
            if r["klass"] == klass:
                out[i] = edges[r["number"]]
    return out


def logistic(x_train, y_train, x_test, c: float = 1.0) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    return model.fit(x_train, y_train).decision_function(x_test)


def auroc(y, score) -> float:
    return float(roc_auc_score(y, score)) if len(set(y)) == 2 else float("nan")


def learning_curve(data: dict, y: np.ndarray, block: np.ndarray, variant: str, log_fn=log) -> dict:
    """AUROC on the other blocks per split and size, each candidate beside the baselines."""
    f = data[f"{variant}/features"].astype(np.float64)
    candidates = {
        "head (features + size)": np.column_stack([f, data[f"{variant}/log_diameter"]]),
        "size alone": data[f"{variant}/log_diameter"][:, None],
        "cell colour alone": data[f"{variant}/mean_rgb"],
        "background alone": data["background"],
    }
    return curve(candidates, y, block, variant, log_fn)


def near(rows: list[dict], block: np.ndarray, b: int, gap: int) -> np.ndarray:
    """Cells outside block b whose field number lies within `gap` numbers of block b's own fields in
    their class: neighbouring fields, likely of the same patients, across the block's edges."""
    out = np.zeros(len(rows), bool)
    for klass in {r["klass"] for r in rows}:
        numbers = [r["number"] for r, k in zip(rows, block, strict=True) if r["klass"] == klass and k == b]
        lo, hi = min(numbers), max(numbers)
        out |= np.array([r["klass"] == klass and k != b and lo - gap <= r["number"] <= hi + gap
                         for r, k in zip(rows, block, strict=True)])
    return out


def curve(candidates: dict[str, np.ndarray], y: np.ndarray, block: np.ndarray, label: str = "", log_fn=log,
          wide: int = 10, left_out: dict[int, np.ndarray] | None = None) -> dict:
    """{"<n>|<name>": AUROC per split}: a logistic head on each candidate's features, fitted on n
    labelled cells of block b (half per class, DRAWS draws) and scored on the other blocks (less
    `left_out[b]`, a mask of cells, where given); C = 0.05 for more than `wide` features, else 1.
    A candidate may be {b: features} when each split's features differ (adapted on block b's cells)."""
    out = {}
    for n in SIZES:
        for name, each in candidates.items():
            per_split = []
            for b in range(BLOCKS):
                x = each[b] if isinstance(each, dict) else each
                kept = ~left_out[b] if left_out else np.ones(len(block), bool)
                train, test = np.flatnonzero(block == b), np.flatnonzero((block != b) & kept)
                scores = []
                for draw in range(DRAWS):
                    rng = np.random.default_rng(draw)
                    picked = np.concatenate([rng.choice(train[y[train] == k], min(n // 2, (y[train] == k).sum()), replace=False)
                                             for k in (0, 1)])
                    c = 0.05 if x.shape[1] > wide else 1.0
                    scores.append(auroc(y[test], logistic(x[picked], y[picked], x[test], c)))
                per_split.append(float(np.mean(scores)))
            out[f"{n}|{name}"] = per_split
            log_fn(f"{label:>6} n={n:3d} {name:34s} AUROC per split {' '.join(f'{a:.3f}' for a in per_split)} "
                   f"mean {np.mean(per_split):.3f}")
    return out


def arguments(doc: str, name: str, extra=None) -> argparse.Namespace:
    """--shared, --cache and --out (experiments/<name>.json) of an Aria experiment, its cache folder
    made; `extra(parser)` adds the experiment's own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dxserve-experiments")
    parser.add_argument("--out", type=Path, default=HERE.parent / f"{name}.json")
    parser.add_argument("--gap", type=int, default=0, help="leave out of the scored cells those of fields within GAP "
                        "numbers of the fitting block's fields in their class (`near`): neighbours across its edges")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    return args


def cached(stored: Path) -> tuple[dict, list[dict]] | None:
    """The arrays and the cells' rows an earlier run saved in `stored` (.npz), or None."""
    if not stored.exists():
        return None
    data = dict(np.load(stored, allow_pickle=True))
    return data, json.loads(str(data.pop("rows")))


def main() -> None:
    args = arguments(__doc__, "site_aria")
    stored = args.cache / "site_aria.npz"
    if (found := cached(stored)) is not None:
        data, rows = found
    else:
        log("Aria: finding cells")
        crops, rows = aria_cells(args.shared / "data" / "aria-taleqani")
        log(f"Aria: {len(crops)} cells in {len({r['path'] for r in rows})} fields")
        pbc_crops, pbc_rows = pbc_cells(args.shared / "data" / "pbc-barcelona")
        log(f"PBC: {len(pbc_crops)} cells of {len(pbc_rows)} crops")
        from dxserve_lymphoblast.data import read_manifest
        cnmc = args.shared / "data" / "cnmc2019"
        manifest = read_manifest(cnmc)[::8]
        reference = lab_stats([np.asarray(Image.open(cnmc / r["path"]).convert("RGB")) for r in manifest])
        log(f"C-NMC colour reference (LAB mean, std) from {len(manifest)} cells: {reference}")
        data = {"reference_mean": reference[0], "reference_std": reference[1]}
        found = [r for r in rows if r["cell"] >= 0]
        data["background"] = np.array([r["background"] for r in found])
        for name, images in (("raw", crops), ("std", [reinhard(c, reference) for c in crops]),
                             ("pbc_raw", pbc_crops), ("pbc_std", [reinhard(c, reference) for c in pbc_crops])):
            log(f"{name}: {len(images)} cells through 2.1.0")
            for key, value in served(images).items():
                data[f"{name}/{key}"] = value
        data["rows"] = np.array(json.dumps(rows))
        data["pbc_rows"] = np.array(json.dumps(pbc_rows))
        np.savez(stored, **data)
        data.pop("rows")
    fields = {r["path"]: r for r in rows}
    found = [r for r in rows if r["cell"] >= 0]
    y = np.array([r["label"] == "blast" for r in found], int)
    block = blocks(found)
    with_cell = {r["path"] for r in found}
    report = {"fields": len(fields), "fields_with_a_cell": len(with_cell), "cells": len(found),
              "cells_per_class": {"blast": int(y.sum()), "normal": int((1 - y).sum())}}
    log(f"{report}")
    for variant in ("raw", "std"):
        logit = data[f"{variant}/logit"]
        p = 1 / (1 + np.exp(-logit / 1.0))
        report[f"{variant}/unadapted"] = {
            "auroc": auroc(y, logit),
            "ood_flagged": float((data[f"{variant}/ood"] > 63.63).mean()),
            "ood_median": float(np.median(data[f"{variant}/ood"])),
            "colour_distance_median": float(np.median(data[f"{variant}/colour_distance"])),
            "gate_passed": float((data[f"{variant}/gate_issues"] == "").mean()),
            "called_blast": float((p >= 0.5).mean()),
        }
        site = data[f"{variant}/features"].astype(np.float64)
        adjusted = head_with_site_stats("2.1.0", site, data[f"{variant}/log_diameter"], site.mean(0), site.std(0))
        report[f"{variant}/site_statistics_head"] = {"auroc": auroc(y, adjusted)}
        log(f"{variant}: {report[f'{variant}/unadapted']}, head on site-standardised features AUROC {auroc(y, adjusted):.3f}")
        report[f"{variant}/curve"] = learning_curve(data, y, block, variant)
    for variant in ("pbc_raw", "pbc_std"):
        report[f"{variant}/unadapted"] = {"ood_flagged": float((data[f"{variant}/ood"] > 63.63).mean()),
                                         "colour_distance_median": float(np.median(data[f"{variant}/colour_distance"])),
                                         "called_blast_at_0.5": float((data[f"{variant}/logit"] >= 0).mean())}
        log(f"{variant}: {report[f'{variant}/unadapted']}")
    args.out.write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
