"""How far the served P(lymphoblast) moves when an image looks like another lab's.

    python benchmarks/robustness.py [--data ../shared/data/cnmc2019] [--images 400] [--version 1.1.0] [--models DIR]

Each image is changed as another microscope or pipeline would change it, and the same
model scores both versions through the serving code path (preprocess + predict). Printed:
the mean and 95th percentile of |delta P| and how often the decision flips, per change.
It measures invariance, not accuracy, so in-sample images are fine for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dxserve.images import to_rgb
from dxserve_lymphoblast.data import read_manifest
from dxserve_lymphoblast.plugin import MODELS_DIR, LymphoblastRuntime, find_version
from dxserve_lymphoblast.preprocess import crop_to_cell, foreground_mask


def on_canvas(rgb: np.ndarray, side: int = 600) -> np.ndarray:
    cell = crop_to_cell(rgb)[:side, :side]
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[30:30 + cell.shape[0], side - 30 - cell.shape[1]:side - 30] = cell
    return canvas


def stain(rgb: np.ndarray) -> np.ndarray:
    shifted = rgb.astype(np.float32) * np.array([1.12, 0.88, 1.05]) + 8 * foreground_mask(rgb)[..., None]
    return np.clip(shifted, 0, 255).astype(np.uint8)


def blur(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(1.2)))


def scale(factor: float):
    def change(rgb: np.ndarray) -> np.ndarray:
        side = round(rgb.shape[0] * factor)
        return np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.LANCZOS))
    return change


CHANGES = {
    "canvas 600 px, cell off-centre": on_canvas,
    "stain / white-balance cast": stain,
    "defocus (Gaussian blur 1.2 px)": blur,
    "grey image (stain colour lost)": lambda rgb: np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, -1),
    "magnification x0.8": scale(0.8),
    "magnification x1.25": scale(1.25),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cnmc2019"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--version", default="")
    parser.add_argument("--models", type=Path, default=MODELS_DIR, help="models folder (default: the plugin's own)")
    args = parser.parse_args()

    version = find_version(args.version, args.models)
    if version is None:
        parser.error(f"no model version {args.version!r}")
    runtime = LymphoblastRuntime(version)
    runtime.load()
    rows = read_manifest(args.data)
    picked = np.random.default_rng(0).choice(len(rows), min(args.images, len(rows)), replace=False)
    images = [to_rgb(Image.open(args.data / rows[i]["path"])) for i in picked]

    def scores(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        p = runtime.predict(np.stack([runtime.preprocess(rgb) for rgb in batch]))
        return p[:, 0], np.array([runtime.decide(row).label for row in p])

    base_p, base_label = scores(images)
    print(f"model {runtime.version.version}, {len(images)} cells from {args.data}")
    print(f"{'change':<40} {'mean |dP|':>10} {'p95 |dP|':>9} {'decision flips':>15}")
    for name, change in CHANGES.items():
        p, label = scores([change(rgb) for rgb in images])
        delta = np.abs(p - base_p)
        print(f"{name:<40} {delta.mean():>10.3f} {np.percentile(delta, 95):>9.3f} {(label != base_label).mean():>14.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
