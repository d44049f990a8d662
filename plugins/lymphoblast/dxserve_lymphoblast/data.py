"""Data pipeline: the C-NMC manifest, a cache of preprocessed cells, subject-grouped splits,
and the augmented tf.data stream used for training."""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dxserve.images import to_rgb
from PIL import Image

from .preprocess import BACKGROUND_MAX, log_diameter, prepare

# Manifest label -> index of the model's label ("lymphoblast" is positive, 1).
MANIFEST_LABELS = {"all": 1, "hem": 0}
IMAGE_SUFFIXES = {".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"}


@dataclass
class Cells:
    """Preprocessed cells with what the splits and reports need."""

    images: np.ndarray  # uint8 (n, size, size, 3), cropped and resized
    log_diameters: np.ndarray  # float32 (n,), preprocess.log_diameter of the original image
    labels: np.ndarray  # int (n,), 1 = lymphoblast, 0 = normal
    subjects: np.ndarray  # str (n,), e.g. "P51", "H10"
    groups: np.ndarray  # str (n,), subject_group: subjects that share images merged
    paths: np.ndarray  # str (n,), relative to the data root

    def subset(self, index: np.ndarray) -> "Cells":
        return Cells(*(getattr(self, f)[index] for f in ("images", "log_diameters", "labels", "subjects", "groups", "paths")))

    def __len__(self) -> int:
        return len(self.labels)


def read_manifest(root: Path) -> list[dict[str, str]]:
    """Rows of manifest.csv, or, for a plain folder, rows inferred from the file names
    (`..._all.png` / `..._hem.png`; subject from the C-NMC naming)."""
    manifest = root / "manifest.csv"
    if manifest.exists():
        with manifest.open(newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        stem = path.stem
        label = stem.rsplit("_", 1)[-1].lower()
        if label not in MANIFEST_LABELS:
            raise ValueError(f"{path}: cannot tell the label (names must end in _all or _hem)")
        parts = stem.split("_")
        subject = parts[1] if len(parts) > 4 else stem
        subject = subject.upper() if label == "hem" else f"P{subject}"
        rows.append({"path": str(path.relative_to(root)), "label": label, "subject": subject, "subject_group": subject})
    return rows


def _load_one(args: tuple[str, int, int]) -> tuple[np.ndarray, float]:
    path, size, window = args
    with Image.open(path) as image:
        rgb = to_rgb(image)  # as the server decodes requests
    return (prepare(rgb, size, window=window) * 255).round().astype(np.uint8), log_diameter(rgb)


def load_cells(root: Path, size: int, cache_dir: Path | None = None, workers: int = 2, window: int = 0) -> Cells:
    """Decode and preprocess every listed image (`preprocess.prepare` with `window`), cached as
    .npz keyed by the file list, size and window."""
    rows = read_manifest(root)
    paths = [r["path"] for r in rows]
    variant = f"|window {window}" if window else ""  # 2.x caches keep their keys
    key = hashlib.sha256(("\n".join(paths) + f"|{size}|{root.resolve()}|v2{variant}").encode()).hexdigest()[:16]
    cache = cache_dir / f"cells-{size}-{key}.npz" if cache_dir else None
    if cache and cache.exists():
        with np.load(cache) as stored:
            images, log_diameters = stored["images"], stored["log_diameters"]
    else:
        jobs = [(str(root / p), size, window) for p in paths]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            loaded = list(pool.map(_load_one, jobs, chunksize=32))
        images = np.stack([image for image, _ in loaded])
        log_diameters = np.array([d for _, d in loaded], np.float32)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, images=images, log_diameters=log_diameters)
    return Cells(
        images=images,
        log_diameters=log_diameters,
        labels=np.array([MANIFEST_LABELS[r["label"]] for r in rows]),
        subjects=np.array([r["subject"] for r in rows]),
        groups=np.array([r.get("subject_group") or r["subject"] for r in rows]),
        paths=np.array(paths),
    )


def grouped_folds(cells: Cells, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs where no subject group is on both sides, class-stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(cells)), cells.labels, cells.groups))


# Largest change of a colour channel's gain in augmentation (stain, white balance).
STAIN_GAIN = 0.15


def augmenter(seed: int):
    """Augmentations that fit single cells: any orientation, small scale and shear, and the
    stain, white-balance, brightness, contrast and focus variation of other microscopes."""
    import keras
    from keras import layers

    geometry = keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomRotation(0.5, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=seed + 2),
            layers.RandomShear(0.08, 0.08, fill_mode="constant", seed=seed + 3),
        ],
        name="geometry",
    )
    appearance = keras.Sequential(
        [
            layers.RandomColorJitter(
                value_range=(0, 1), brightness_factor=0.15, contrast_factor=0.2, saturation_factor=(0.35, 0.65), hue_factor=0.04, seed=seed + 4
            ),
            layers.RandomGaussianBlur(factor=0.6, kernel_size=5, sigma=(0.0, 1.5), value_range=(0, 1), seed=seed + 5),
        ],
        name="appearance",
    )
    gain_seed = keras.random.SeedGenerator(seed + 6)

    def augment(images):
        images = geometry(images, training=True)
        # Jitter the cell only: the background stays black, as segmentation leaves it.
        cell = keras.ops.cast(keras.ops.max(images, axis=-1, keepdims=True) > BACKGROUND_MAX / 255, images.dtype)
        # Another lab's stain and white balance: a gain per colour channel.
        gains = keras.random.uniform((keras.ops.shape(images)[0], 1, 1, 3), 1 - STAIN_GAIN, 1 + STAIN_GAIN, seed=gain_seed)
        return keras.ops.clip(appearance(images, training=True) * gains, 0.0, 1.0) * cell

    return augment


# Training jitters the measured size by this much (log scale): segmentation and focus vary.
DIAMETER_JITTER = 0.04


def sample_weights(labels: np.ndarray, groups: np.ndarray, subject_power: float = 0.5, balance_classes: bool = True) -> np.ndarray:
    """Per-image training weights: within a class an image of a subject group with n images
    weighs 1 / n ** subject_power; each class weighs the same in total (`balance_classes`)
    or as many as it has images (the model then learns the data's class prior, and
    P >= 0.5 is the most probable label there).

    With power 0 every image of a class counts alike, and the largest subjects (P51: 758
    images, H10: 403) dominate what the model learns; with 1 every subject counts alike,
    and a subject's 2 images weigh as much as another's 400. 0.5 is between: the model
    learns what blasts share across people more than one person's look.
    """
    _, index, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[index].astype(np.float64) ** subject_power
    for label in (0, 1):
        here = labels == label
        if here.any():
            total = len(labels) / 2.0 if balance_classes else here.sum()
            weights[here] *= total / weights[here].sum()
    return weights.astype(np.float32)


def dataset(cells: Cells, batch_size: int, training: bool, seed: int = 0, subject_power: float = 0.0,
            balance_classes: bool = True):
    """tf.data of ({"cell": float image in [0, 1], "log_diameter": (1,)}, label, sample weight).
    Training draws shuffled, augmented batches weighted by `sample_weights`."""
    import tensorflow as tf

    weights = sample_weights(cells.labels, cells.groups, subject_power, balance_classes)
    inputs = {"cell": cells.images, "log_diameter": cells.log_diameters.astype(np.float32)[:, None]}
    ds = tf.data.Dataset.from_tensor_slices((inputs, cells.labels.astype(np.float32), weights))
    if training:
        ds = ds.shuffle(len(cells), seed=seed, reshuffle_each_iteration=True)

    def scale(x, y, w):
        return {"cell": tf.cast(x["cell"], tf.float32) / 255.0, "log_diameter": x["log_diameter"]}, y, w

    ds = ds.batch(batch_size).map(scale, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        augment = augmenter(seed)
        generator = tf.random.Generator.from_seed(seed)

        def jitter(x, y, w):
            noise = generator.normal(tf.shape(x["log_diameter"]), stddev=DIAMETER_JITTER)
            return {"cell": augment(x["cell"]), "log_diameter": x["log_diameter"] + noise}, y, w

        ds = ds.map(jitter, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
