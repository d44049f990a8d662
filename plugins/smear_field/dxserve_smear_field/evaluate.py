"""Measure the detector on BCCD (IoU >= 0.5 against the white-cell boxes), per split, and the
field gate's figures on real fields and on images that are not fields.

    python -m dxserve_smear_field.evaluate --data ../shared/data/bccd [--version 1.0.0]

Prints recall, precision, mean IoU of the matched boxes and ms per field (one thread) for
train, val and test, the same for each split tiled into large fields (`--large` fields a side,
sent with BCCD's scale, as acquisition software would: where a version searches coarsely), then
the gate's statistics; the model card quotes its output.
"""

from __future__ import annotations

import argparse
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from . import detect
from .plugin import version_folder


def white_cells(annotation: Path) -> list[tuple[float, float, float, float]]:
    """The WBC boxes (x0, y0, x1, y1) of a Pascal VOC file; coordinates may be decimals."""
    boxes = []
    for item in ET.parse(annotation).getroot().iter("object"):
        if item.findtext("name") == "WBC":
            box = item.find("bndbox")
            boxes.append(tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def iou(a, b) -> float:
    width, height = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match(found, truth, threshold: float = 0.5) -> tuple[int, int, int, list[float]]:
    """(true positives, false positives, false negatives, IoUs of the matches), greedy by IoU."""
    pairs = sorted(((iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_f, used_t, ious = set(), set(), []
    for value, i, j in pairs:
        if value >= threshold and i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
            ious.append(value)
    return len(ious), len(found) - len(ious), len(truth) - len(ious), ious


def split(data: Path, name: str, p: detect.Parameters) -> dict:
    tp = fp = fn = 0
    ious, seconds = [], 0.0
    stems = (data / "ImageSets" / "Main" / f"{name}.txt").read_text().split()
    for stem in stems:
        rgb = cv2.cvtColor(cv2.imread(str(data / "JPEGImages" / f"{stem}.jpg")), cv2.COLOR_BGR2RGB)
        started = time.perf_counter()
        cells, _ = detect.find(rgb, p)
        seconds += time.perf_counter() - started
        a, b, c, matched = match(corners(cells), white_cells(data / "Annotations" / f"{stem}.xml"))
        tp, fp, fn, ious = tp + a, fp + b, fn + c, ious + matched
    return scores(name, len(stems), tp, fp, fn, ious, seconds)


def corners(cells) -> list[tuple[int, int, int, int]]:
    """The found cells' boxes as (x0, y0, x1, y1), as the annotations give theirs."""
    return [(c.box[0], c.box[1], c.box[0] + c.box[2], c.box[1] + c.box[3]) for c in cells]


def scores(name: str, fields: int, tp: int, fp: int, fn: int, ious: list[float], seconds: float) -> dict:
    return {"split": name, "fields": fields, "recall": tp / max(1, tp + fn), "precision": tp / max(1, tp + fp),
            "tp": tp, "fp": fp, "fn": fn, "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "ms_per_field": 1000 * seconds / max(1, fields)}


#: BCCD's scale as the acquisition software would send it: the median of the red-cell estimate
#: over its 364 fields (14.9 px per um), for the large fields below, where the scale is given.
BCCD_MICRONS_PER_PIXEL = 1 / 14.9


def large_fields(data: Path, name: str, p: detect.Parameters, side: int) -> dict:
    """The split's fields tiled side x side into large fields (640 x 480 each; the last one
    cycled round), each sent with BCCD's scale: recall, precision and ms a large field (one
    thread), as `split` measures single fields."""
    stems = (data / "ImageSets" / "Main" / f"{name}.txt").read_text().split()
    per = side * side
    tp = fp = fn = 0
    ious, seconds, count = [], 0.0, 0
    for start in range(0, len(stems), per):
        group = [stems[(start + i) % len(stems)] for i in range(per)]
        tiles, truth = [], []
        for i, stem in enumerate(group):
            rgb = cv2.cvtColor(cv2.imread(str(data / "JPEGImages" / f"{stem}.jpg")), cv2.COLOR_BGR2RGB)[:480, :640]
            tiles.append(cv2.copyMakeBorder(rgb, 0, 480 - rgb.shape[0], 0, 640 - rgb.shape[1], cv2.BORDER_REFLECT))
            dx, dy = (i % side) * 640, (i // side) * 480
            truth += [(x0 + dx, y0 + dy, x1 + dx, y1 + dy) for x0, y0, x1, y1 in white_cells(data / "Annotations" / f"{stem}.xml")]
        field = np.vstack([np.hstack(tiles[r * side:(r + 1) * side]) for r in range(side)])
        started = time.perf_counter()
        cells, _ = detect.find(field, p, BCCD_MICRONS_PER_PIXEL)
        seconds += time.perf_counter() - started
        a, b, c, matched = match(corners(cells), truth)
        tp, fp, fn, ious, count = tp + a, fp + b, fn + c, ious + matched, count + 1
    return scores(name, count, tp, fp, fn, ious, seconds)


def not_fields(data: Path) -> dict[str, np.ndarray]:
    """Images that are not stained smear fields, and a field made unusable, all 640 x 480."""
    rng = np.random.default_rng(0)
    field = cv2.cvtColor(cv2.imread(str(data / "JPEGImages" / "BloodImage_00007.jpg")), cv2.COLOR_BGR2RGB)
    y, x = np.mgrid[0:480, 0:640]
    landscape = np.stack([(y < 240) * 120 + 60, 100 + (y >= 240) * 100, (y < 240) * 200 + 30], axis=-1).astype(np.uint8)
    landscape = cv2.GaussianBlur(landscape + rng.integers(0, 25, landscape.shape, dtype=np.uint8), (9, 9), 3)
    return {"blank": np.full((480, 640, 3), 235, np.uint8),
            "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
            "photo-like (sky over grass)": landscape,
            "the field defocused (Gaussian blur, sigma 6 px)": cv2.GaussianBlur(field, (0, 0), 6)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[4] / "shared" / "data" / "bccd")  # beside the project root
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--large", type=int, default=5, help="side, in fields, of the large fields (5: 3200 x 2400 px)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    p = detect.Parameters.load(version_folder(args.version) / "parameters.json")
    for name in ("train", "val", "test"):
        r = split(args.data, name, p)
        print(f"{r['split']:5s} {r['fields']:3d} fields: recall {r['recall']:.3f} precision {r['precision']:.3f} "
              f"(tp {r['tp']}, fp {r['fp']}, fn {r['fn']}), mean IoU {r['mean_iou']:.2f}, {r['ms_per_field']:.1f} ms a field")
    for name in ("train", "val", "test"):
        r = large_fields(args.data, name, p, args.large)
        print(f"{r['split']:5s} as {r['fields']} fields of {args.large} x {args.large}, scale given: recall {r['recall']:.3f} "
              f"precision {r['precision']:.3f} (tp {r['tp']}, fp {r['fp']}, fn {r['fn']}), mean IoU {r['mean_iou']:.2f}, "
              f"{r['ms_per_field']:.0f} ms a large field")
    stats = {"stained": [], "smear_hues": [], "focus": [], "scale": []}
    for path in sorted((args.data / "JPEGImages").glob("*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        _, saturation = detect._hsv(rgb)
        stats["stained"].append((saturation > p.rbc_min_saturation).mean())
        stats["smear_hues"].append(detect.smear_hue_share(rgb, p))  # what the field gate measures
        stats["focus"].append(detect._laplacian_variance(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)))
        stats["scale"].append(detect.scale(rgb, p))
    for name, values in stats.items():
        print(f"BCCD fields' {name}: min {np.min(values):.3f}, p1 {np.percentile(values, 1):.3f}, "
              f"median {np.median(values):.3f}, max {np.max(values):.3f}")
    for name, rgb in not_fields(args.data).items():
        cells, issues = detect.find(rgb, p)
        print(f"{name}: {[i.code for i in issues] or 'no issue'}, {len(cells)} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
