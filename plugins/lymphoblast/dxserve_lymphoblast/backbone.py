"""The pretrained CNN feature extractor: ImageNet MobileNet v1 (alpha 0.25), verified by hash.

The ImageNet weights are read from a local file (nothing is downloaded) and only when a
model is built for training; the shipped `model.keras` holds every weight it uses, so
serving never needs this file. The file's SHA-256 is checked before it is loaded and
recorded in the model card as the initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

from dxserve.runtime import sha256_of

# keras.applications.MobileNet(alpha=0.25, include_top=False): see ../shared/weights/imagenet/README.md.
IMAGENET_FILE = "mobilenet_2_5_224_tf_no_top.h5"
IMAGENET_SHA256 = "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf"
IMAGENET_SOURCE = (
    "keras.applications MobileNet v1 alpha 0.25 no-top ImageNet weights (Keras applications file "
    f"{IMAGENET_FILE}, translated from tensorflow/models research/slim, Apache-2.0, Google / the TensorFlow authors)"
)
ALPHA = 0.25
# Where the weights are looked for: $DXSERVE_IMAGENET_WEIGHTS, else ../shared/weights/imagenet
# beside the working directory (the developers' layout).
DEFAULT_WEIGHTS = Path("../shared/weights/imagenet") / IMAGENET_FILE


class WeightsHashMismatch(ValueError):
    """The ImageNet weights file is not the one the recipe was written for."""


def imagenet_weights(path: Path | None = None, sha256: str = IMAGENET_SHA256) -> Path:
    """The verified path of the ImageNet weights; raises if it is missing or its hash differs."""
    path = Path(path or os.environ.get("DXSERVE_IMAGENET_WEIGHTS") or DEFAULT_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights not found at {path} (set DXSERVE_IMAGENET_WEIGHTS or --imagenet-weights)")
    actual = sha256_of(path)
    if actual != sha256:
        raise WeightsHashMismatch(f"{path}: SHA-256 {actual} is not the expected {sha256}; refusing to load it")
    return path


def build_backbone(image_size: int | None, weights: Path | None):
    """MobileNet v1 (alpha 0.25) without its classifier: (s, s, 3) in [-1, 1] -> (s/32, s/32, 256).
    `image_size` None accepts any size (it is fully convolutional).

    `weights`: a path already checked by `imagenet_weights`, or None for random
    initialisation (tests; a model whose weights come from a saved file).
    """
    import keras

    base = keras.applications.MobileNet(
        input_shape=(image_size, image_size, 3), alpha=ALPHA, include_top=False, weights=None, name="mobilenet"
    )
    if weights is not None:
        base.load_weights(str(weights))
    return base
