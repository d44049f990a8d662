"""Frozen backbone features, cached to disk: the cheap stage of training.

A forward pass of the backbone over every cell in its 8 orientations takes minutes on two
CPU cores; an MLP head on the cached features trains in seconds, so many head variants
can be compared in the same folds. Cells have no orientation: the 8 views (4 rotations,
each also mirrored) are training samples for the head and can be averaged at test time.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

VIEWS = 8


def view(images: np.ndarray, k: int) -> np.ndarray:
    """View k (0-7) of a batch (n, s, s, c): rotated by k % 4 quarter turns, mirrored when k >= 4."""
    rotated = np.rot90(images, k % 4, axes=(1, 2))
    return np.ascontiguousarray(rotated[:, :, ::-1] if k >= 4 else rotated)


def extractor(image_size: int, weights: Path | None, scales: tuple[int, ...] | None = None):
    """Keras model: cells (n, s, s, 3) in [0, 1] -> the features `model.build_classifier` computes."""
    import keras

    from .model import feature_extractor

    cell = keras.Input((image_size, image_size, 3), name="cell")
    return keras.Model(cell, feature_extractor(cell, weights, scales), name="frozen_features")


def extract(images: np.ndarray, weights: Path | None, scales: tuple[int, ...] | None = None, views: int = VIEWS,
            batch_size: int = 64, log=print) -> np.ndarray:
    """float16 (n, views, d) features of uint8 cells (n, s, s, 3)."""
    import tensorflow as tf

    model = extractor(images.shape[1], weights, scales)
    forward = tf.function(lambda x: model(x, training=False), autograph=False, reduce_retracing=True)
    out = None
    started = time.time()
    for k in range(views):
        for start in range(0, len(images), batch_size):
            batch = view(images[start:start + batch_size], k).astype(np.float32) / 255.0
            f = forward(batch).numpy()
            if out is None:
                out = np.zeros((len(images), views, f.shape[1]), np.float16)
            out[start:start + len(f), k] = f
        log(f"features: view {k + 1}/{views} done, {time.time() - started:.0f} s")
    return out


def augmented(images: np.ndarray, seed: int, batch_size: int = 64) -> np.ndarray:
    """A copy of uint8 cells (n, s, s, 3) as other microscopes might show them
    (`data.augmenter`: orientation, zoom, shear, stain and white balance, contrast, blur)."""
    from .data import augmenter

    augment = augmenter(seed)
    out = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32) / 255.0
        out[start:start + len(batch)] = np.clip(np.asarray(augment(batch)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def cached_features(images: np.ndarray, paths: np.ndarray, scales: tuple[int, ...], cache_dir: Path | None,
                    weights: Path | None, augment_seed: int | None = None, log=print, window: int = 0) -> np.ndarray:
    """`extract` of the cells, or of an `augmented` copy of them with `augment_seed`, cached as
    .npy keyed by the cells, their size, the scales, the weights file, the augmentation and
    the `window` they were cropped with (`data.load_cells`)."""
    tag = weights.name if weights else "random"
    variant = ("" if augment_seed is None else f"|augmented {augment_seed}") + (f"|window {window}" if window else "")
    key = hashlib.sha256(f"{'|'.join(paths.tolist())}|{images.shape}|{scales}|{tag}|{VIEWS}|f3{variant}".encode())
    cache = cache_dir / f"features-{images.shape[1]}-{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cache and cache.exists():
        return np.load(cache)
    if augment_seed is not None:
        images = augmented(images, augment_seed)
    features = extract(images, weights, scales, log=log)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, features)
    return features
