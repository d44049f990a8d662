"""Issue 33, item 1: is a colour-standardised lymphoblast version worth shipping? In the training
command's subject-grouped folds, with 2.1.0's recipe (3 MLP heads, 2 views, size, 20 epochs):

    python plugins/lymphoblast/experiments/stain_cnmc.py [--data DIR] [--cache DIR]

- **raw**: the cells as 2.1.0 sees them;
- **reinhard**: each cell's pixels (not the black background) moved in CIELAB to the mean and
  spread of the C-NMC developer cells' pixels (Reinhard et al. 2001; the reference is label-free,
  pooled over 400 developer cells drawn at random: one lab, one reference);
- **reinhard-mean**: only the mean moved (the spread kept: texture contrast untouched).

Each recipe's pooled out-of-fold AUROC, per fold, ECE, and how many folds beat raw. Research:
nothing here is shipped; RESULTS.md says what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from site_aria import lab2rgb, rgb2lab  # noqa: E402

from dxserve_lymphoblast.backbone import imagenet_weights  # noqa: E402
from dxserve_lymphoblast.cli import DEFAULT_DATA  # noqa: E402
from dxserve_lymphoblast.data import load_cells  # noqa: E402
from dxserve_lymphoblast.features import cached_features  # noqa: E402
from dxserve_lymphoblast.train import MODEL, TrainConfig, cross_validate  # noqa: E402

RECIPE = TrainConfig(heads=3, test_views=2)  # 2.1.0's card


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def reference(images: np.ndarray, sample: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread per CIELAB channel of the cells' pixels, pooled over a sample of cells."""
    rng = np.random.default_rng(0)
    picked = rng.choice(len(images), min(sample, len(images)), replace=False)
    pixels = np.concatenate([rgb2lab(images[i][images[i].max(axis=2) > 12]) for i in picked])
    return pixels.mean(axis=0), pixels.std(axis=0)


def standardised(images: np.ndarray, target: tuple[np.ndarray, np.ndarray], spread: bool) -> np.ndarray:
    out = np.zeros_like(images)
    for i, cell in enumerate(images):
        mask = cell.max(axis=2) > 12
        if mask.sum() < 16:
            out[i] = cell
            continue
        lab = rgb2lab(cell[mask])
        scale = target[1] / np.maximum(lab.std(axis=0), 1e-3) if spread else 1.0
        lab = (lab - lab.mean(axis=0)) * scale + target[0]
        out[i][mask] = np.clip(lab2rgb(lab) * 255 + 0.5, 13, 255).astype(np.uint8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    weights = imagenet_weights(None)
    cells = load_cells(args.data, RECIPE.image_size, args.cache)
    log(f"{len(cells)} cells")
    target = reference(cells.images)
    log(f"reference (CIELAB mean, spread): {np.round(target[0], 2).tolist()} {np.round(target[1], 2).tolist()}")
    results = {}
    for name, spread in (("raw", None), ("reinhard", True), ("reinhard-mean", False)):
        images = cells.images if spread is None else standardised(cells.images, target, spread)
        paths = cells.paths if spread is None else np.array([p + f"|{name}" for p in cells.paths])
        features = cached_features(images, paths, RECIPE.scales, args.cache, weights, log=log)
        log(f"{name}: features {features.shape}")
        report, _ = cross_validate(cells, features, RECIPE, log=lambda m: None)
        results[name] = report["candidates"][MODEL]
    raw_folds = [f["auroc"] for f in results["raw"]["folds"]]
    for name, result in results.items():
        folds = [f["auroc"] for f in result["folds"]]
        pooled = result["pooled_out_of_fold"]
        ci = [round(v, 3) for v in result["bootstrap_over_subjects"]["auroc_95ci"]]
        log(f"{name:14s} pooled AUROC {pooled['auroc']:.4f} CI {ci} ECE {pooled['ece']:.4f} per fold "
            + " ".join(f"{a:.3f}" for a in folds) + f"; better than raw in {sum(a > b for a, b in zip(folds, raw_folds))}/5")


if __name__ == "__main__":
    main()
