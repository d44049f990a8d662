"""Issue 14 (round 3) head experiments, in the training command's subject-grouped folds.
Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/round3.py [--data DIR] [--cache DIR] [--window 320]

On cached frozen-MobileNet features (the expensive part, ~2 min per input variant on 2 cores,
cached in --cache) it compares, per fold and pooled:
- the input: the 2.0.0 crop-and-resize, and that concatenated with a fixed-size window centred
  on the cell and resized once for every cell (one physical scale), log diameter kept;
- test-time orientation averaging (1, 2, 8 views) and a 3-seed ensemble of heads over one backbone pass;
- per-subject feature centring (a specimen-aware variant; see RESULTS.md for why it is not per-cell evidence);
- calibration maps (none, temperature, Platt, beta, isotonic), each fitted on the other folds'
  out-of-fold logits with images or subjects weighted equally, by per-fold ECE.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import f1_score, roc_auc_score

from dxserve.images import to_rgb
from dxserve_lymphoblast import baselines
from dxserve_lymphoblast.backbone import imagenet_weights
from dxserve_lymphoblast.calibration import expected_calibration_error
from dxserve_lymphoblast.cli import DEFAULT_DATA
from dxserve_lymphoblast.data import Cells, grouped_folds, load_cells, read_manifest
from dxserve_lymphoblast.features import cached_features
from dxserve_lymphoblast.preprocess import cell_square, foreground_mask, resize
from dxserve_lymphoblast.train import TrainConfig, head_logits, train_head

SEEDS = (0, 1, 2)
METHODS = ("none", "temperature", "platt", "beta", "isotonic")  # calibration maps compared


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fixed_window(job: tuple[str, int]) -> np.ndarray:
    """A window x window square of the canvas centred on the cell (black outside), resized to 224."""
    path, window = job
    with Image.open(path) as image:
        rgb = to_rgb(image)
    square = cell_square(foreground_mask(rgb))
    h, w = rgb.shape[:2]
    cy, cx = (square[0] + square[2] // 2, square[1] + square[2] // 2) if square else (h // 2, w // 2)
    y0, x0 = cy - window // 2, cx - window // 2
    out = np.zeros((window, window, 3), np.uint8)
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + window, h), min(x0 + window, w)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return resize(out, 224)


def window_cells(root: Path, cells: Cells, window: int, cache: Path) -> Cells:
    key = hashlib.sha256(f"{'|'.join(cells.paths.tolist())}|window{window}".encode()).hexdigest()[:16]
    stored = cache / f"window-{window}-{key}.npy"
    if stored.exists():
        images = np.load(stored)
    else:
        with ProcessPoolExecutor(2) as pool:
            images = np.stack(list(pool.map(fixed_window, [(str(root / r["path"]), window) for r in read_manifest(root)], chunksize=32)))
        np.save(stored, images)
    return replace(cells, images=images, paths=np.array([p + f"|window{window}" for p in cells.paths]))


def centred_per_subject(features: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    out = features.astype(np.float32).copy()
    for s in np.unique(subjects):
        out[subjects == s] -= out[subjects == s].mean(axis=(0, 1), keepdims=True)
    return out


def out_of_fold(features: np.ndarray, cells: Cells, folds, config: TrainConfig) -> dict[str, np.ndarray]:
    """Logits per (views, seed 0 | 3-seed ensemble), each from heads that never saw the cell's subject."""
    z = {v: np.zeros((len(SEEDS), len(cells))) for v in (1, 2, 8)}
    for k, (train, test) in enumerate(folds):
        for i, seed in enumerate(SEEDS):
            head, _ = train_head(features[train], cells.subset(train), replace(config, seed=seed))
            for v in z:
                z[v][i, test] = head_logits(head, features[test], cells.log_diameters[test], v)
        log(f"  fold {k + 1} done")
    return {f"views {v} | {name}": (zv[0] if name == "seed 0" else zv.mean(axis=0))
            for v, zv in z.items() for name in ("seed 0", "3-seed ensemble")}


def weights(subjects: np.ndarray, equal_subjects: bool) -> np.ndarray:
    if not equal_subjects:
        return np.ones(len(subjects))
    _, index, counts = np.unique(subjects, return_inverse=True, return_counts=True)
    w = 1.0 / counts[index]
    return w / w.mean()


def nll(p, y, w):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / w.sum()


def fit_map(method: str, z, y, w):
    if method == "none":
        return expit
    if method == "temperature":
        t = np.exp(minimize(lambda a: nll(expit(z / np.exp(a[0])), y, w), [0.0]).x[0])
        return lambda zz: expit(zz / t)
    if method == "platt":
        a, b = minimize(lambda a: nll(expit(a[0] * z + a[1]), y, w), [1.0, 0.0]).x
        return lambda zz: expit(a * zz + b)
    if method == "beta":  # Kull et al. 2017: a ln p - b ln(1 - p) + c, with ln p = -softplus(-z)
        beta = lambda zz, a: expit(-a[0] * np.logaddexp(0, -zz) + a[1] * np.logaddexp(0, zz) + a[2])  # noqa: E731
        fitted = minimize(lambda a: nll(beta(z, a), y, w), [1.0, 1.0, 0.0]).x
        return lambda zz: beta(zz, fitted)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-4, y_max=1 - 1e-4).fit(z, y, sample_weight=w)
    return iso.predict


def report(name: str, z: np.ndarray, cells: Cells, fold: np.ndarray, reference: np.ndarray | None) -> None:
    y = cells.labels.astype(float)
    auroc = [roc_auc_score(y[fold == k], z[fold == k]) for k in range(fold.max() + 1)]
    better = "" if reference is None else f", better than 2.0.0 in {sum(a > b for a, b in zip(auroc, reference))}/5 folds"
    log(f"{name}: pooled AUROC {roc_auc_score(y, z):.3f}, per fold " + " ".join(f"{a:.3f}" for a in auroc) + better)
    for equal in (False, True):
        for method in METHODS:
            eces, f1s = [], []
            for k in range(fold.max() + 1):
                fit, held = fold != k, fold == k
                p = fit_map(method, z[fit], y[fit], weights(cells.subjects[fit], equal))(z[held])
                eces.append(expected_calibration_error(p, y[held]))
                f1s.append(f1_score(y[held], p >= 0.5, average="weighted"))
            log(f"    {'subjects equal' if equal else 'images equal':14s} {method:11s} per-fold ECE mean {np.mean(eces):.4f} ["
                + " ".join(f"{e:.3f}" for e in eces) + "]  wF1 " + " ".join(f"{f:.3f}" for f in f1s))


def cached_inputs(data: Path, cache: Path, window: int):
    """The experiments' common ground: (the training command's config with 2 views, the cells,
    its folds, each cell's fold, the crop's frozen features, the fixed window's), cached in `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    config, backbone = TrainConfig(test_views=2), imagenet_weights()
    cells = load_cells(data, config.image_size, cache)
    folds = grouped_folds(cells, config.folds, config.seed)
    fold = np.zeros(len(cells), int)
    for k, (_, test) in enumerate(folds):
        fold[test] = k
    crop = cached_features(cells.images, cells.paths, config.scales, cache, backbone, log=log)
    windowed = window_cells(data, cells, window, cache)
    return config, cells, folds, fold, crop, cached_features(windowed.images, windowed.paths, config.scales, cache, backbone, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--window", type=int, default=320, help="side of the fixed window, canvas pixels")
    args = parser.parse_args()
    config, cells, folds, fold, crop, window = cached_inputs(args.data, args.cache, args.window)
    combo = np.concatenate([crop, window], axis=2)
    variants = {"2.0.0 input (crop and resize)": crop, f"{args.window} px window alone": combo[:, :, crop.shape[2]:],
                f"crop and resize + {args.window} px window": combo,
                f"crop and resize + {args.window} px window, centred per subject": centred_per_subject(combo, cells.subjects)}
    size = np.zeros(len(cells))
    for train, test in folds:
        size[test] = baselines.size_alone(cells.log_diameters[train], cells.labels[train], cells.log_diameters[test])
    reference = None
    report("size alone", size, cells, fold, None)
    for name, features in variants.items():
        log(f"{name}: training heads")
        for variant, z in out_of_fold(features, cells, folds, config).items():
            if reference is None and variant == "views 2 | seed 0":  # 2.0.0 as shipped: 2 views, one head
                reference = [roc_auc_score(cells.labels[fold == k], z[fold == k]) for k in range(len(folds))]
            report(f"{name} | {variant}", z, cells, fold, reference)


if __name__ == "__main__":
    main()
