"""Issue 33, second round: do features that 2.1.0 never narrowed to C-NMC separate Aria's cells better?
Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_aria_native.py [--shared DIR] [--cache DIR]

The same cells, splits, draws and baselines as `site_aria.py` (its cache is reused; run it
first), with three more feature sets per cell:
- `imagenet_box`: the ImageNet MobileNet (alpha 0.25, `../shared/weights`) pooled features of the
  cell's box in the field at its native pixels (padded by a fifth, upscaled to 224 px): what a
  generic network sees of the cell and its nearest surroundings.
- `imagenet_canvas`: the same network on the classifier's input (the cell on black at C-NMC's
  scale), so only the cell's own pixels count.
- `morphology`: 14 hand-made measurements that do not depend on the slide's colour: the cell's
  area, roundness and solidity, the nucleus's share of the cell and its roundness (nucleus by
  Otsu on saturation within the cell), chromatin texture (grey-level spread and gradient within
  the nucleus, each divided by the field's own background brightness), and colour contrasts of
  nucleus and cytoplasm against the field's background (ratios, not absolute colour).
Each is scored alone and beside 2.1.0's features, in the learning curve of `site_aria.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from site_aria import ARIA_UM_PER_PX, SHARED, SITE_DETECTOR, blocks, curve, detector, log, mask_scale_bar  # noqa: E402


def field_cells(root: Path):
    """Every Aria field's detected cells (as `site_aria.aria_cells` finds them), with box and field."""
    import csv
    import re

    from PIL import Image
    from dxserve_smear_field.detect import find

    p = detector(SITE_DETECTOR)
    for r in csv.DictReader(open(root / "manifest.csv")):
        rgb = mask_scale_bar(np.asarray(Image.open(root / r["path"]).convert("RGB")))
        cells, _ = find(rgb, p, ARIA_UM_PER_PX)
        number = int(re.search(r"(\d+)\.jpg$", r["path"]).group(1))
        for i, cell in enumerate(cells):
            yield r, number, i, rgb, cell


def box_crop(rgb: np.ndarray, box, pad: float = 0.2, size: int = 224) -> np.ndarray:
    from PIL import Image

    x, y, w, h = box
    side = int(max(w, h) * (1 + 2 * pad))
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(cx - side / 2), int(cy - side / 2)
    padded = np.pad(rgb, ((side, side), (side, side), (0, 0)), mode="reflect")
    crop = padded[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def morphology(rgb: np.ndarray, cell) -> np.ndarray:
    import cv2

    x, y, w, h = cell.box
    patch = rgb[y:y + h, x:x + w].astype(np.float32)
    mask = cell.mask.astype(bool)
    grey_field = rgb.mean(axis=2)
    bright = np.percentile(grey_field, 80)
    background = rgb[grey_field >= bright].mean(axis=0) + 1e-3
    hsv = cv2.cvtColor(rgb[y:y + h, x:x + w], cv2.COLOR_RGB2HSV).astype(np.float32)
    sat = hsv[..., 1][mask]
    threshold, _ = cv2.threshold(sat.astype(np.uint8).reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    nucleus = mask & (hsv[..., 1] > threshold)
    cytoplasm = mask & ~nucleus

    def shape(m):
        m8 = m.astype(np.uint8)
        contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            return 0.0, 0.0
        c = max(contours, key=cv2.contourArea)
        area, perimeter = cv2.contourArea(c), cv2.arcLength(c, True)
        hull = cv2.contourArea(cv2.convexHull(c))
        return (4 * np.pi * area / perimeter ** 2 if perimeter else 0.0), (area / hull if hull else 0.0)

    grey = patch.mean(axis=2) / background.mean()
    gy, gx = np.gradient(grey)
    gradient = np.hypot(gx, gy)
    n_pix = max(int(nucleus.sum()), 1)
    c_pix = max(int(cytoplasm.sum()), 1)
    cell_round, cell_solid = shape(mask)
    nuc_round, nuc_solid = shape(nucleus)
    nuc_rgb = patch[nucleus].mean(axis=0) / background if nucleus.any() else np.ones(3)
    cyt_rgb = patch[cytoplasm].mean(axis=0) / background if cytoplasm.any() else np.ones(3)
    um2 = ARIA_UM_PER_PX ** 2
    return np.array([
        np.log(mask.sum() * um2 + 1), cell_round, cell_solid, n_pix / mask.sum(), nuc_round, nuc_solid,
        grey[nucleus].std() if nucleus.any() else 0, gradient[nucleus].mean() if nucleus.any() else 0,
        grey[cytoplasm].std() if cytoplasm.any() else 0, c_pix / mask.sum(),
        *(np.log(nuc_rgb) - np.log(cyt_rgb)), np.log(nuc_rgb).mean(),
    ])


def imagenet_features(images: list[np.ndarray], weights: Path) -> np.ndarray:
    import tensorflow as tf

    base = tf.keras.applications.MobileNet(input_shape=(224, 224, 3), alpha=0.25, include_top=False, weights=str(weights),
                                           pooling="avg")
    x = tf.keras.applications.mobilenet.preprocess_input(np.stack(images).astype(np.float32))
    return base.predict(x, batch_size=64, verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dxserve-experiments")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "site_aria_native.json")
    args = parser.parse_args()
    data = dict(np.load(args.cache / "site_aria.npz", allow_pickle=True))
    rows = [r for r in json.loads(str(data["rows"])) if r["cell"] >= 0]
    stored = args.cache / "site_aria_native.npz"
    if stored.exists():
        extra = dict(np.load(stored))
    else:
        log("Aria: finding cells again (the site_aria.py detector)")
        boxes, canvases, morph, keys = [], [], [], []
        for r, number, i, rgb, cell in field_cells(args.shared / "data" / "aria-taleqani"):
            keys.append((r["path"], i))
            boxes.append(box_crop(rgb, cell.box))
            from PIL import Image
            canvases.append(np.asarray(Image.fromarray(cell.crop).resize((224, 224), Image.BILINEAR)))
            morph.append(morphology(rgb, cell))
        if keys != [(r["path"], r["cell"]) for r in rows]:
            raise SystemExit("the detector found other cells than site_aria.py's cache: rerun site_aria.py first")
        weights = args.shared / "weights" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5"
        log(f"{len(keys)} cells; ImageNet features")
        extra = {"imagenet_box": imagenet_features(boxes, weights), "imagenet_canvas": imagenet_features(canvases, weights),
                 "morphology": np.array(morph)}
        np.savez(stored, **extra)
    y = np.array([r["label"] == "blast" for r in rows], int)
    block = blocks(rows)
    cnn = np.column_stack([data["raw/features"].astype(np.float64), data["raw/log_diameter"]])
    sets = {
        "2.1.0 features + size (site_aria)": cnn,
        "imagenet_box": extra["imagenet_box"],
        "imagenet_canvas": extra["imagenet_canvas"],
        "morphology": extra["morphology"],
        "2.1.0 + morphology": np.column_stack([cnn, extra["morphology"]]),
        "imagenet_canvas + morphology": np.column_stack([extra["imagenet_canvas"], extra["morphology"]]),
        "background alone": data["background"],
        "cell colour alone": data["raw/mean_rgb"],
    }
    report = {"cells": len(rows), "curve": curve(sets, y, block, wide=20)}
    args.out.write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
