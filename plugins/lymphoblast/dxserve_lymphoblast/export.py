"""Export a 2.x version's Keras model to LiteRT (`model.tflite`), the served format.

Needs TensorFlow (`pip install dxserve-lymphoblast[train]`); serving does not.

The exported graph is one view of the cell: uint8 (n, s, s, 3) scaled to [0, 1] in the graph,
and its log diameter -> the logit and the CNN features (`litert.py` averages the views). It is
the Keras model's own layers, reused, with one change: the smaller scales' area resize
(`layers.Resizing(interpolation="area")`, TensorFlow's ResizeArea, which has no LiteRT kernel)
is done as what it is, a linear map: each output pixel the overlap-weighted mean of the input
pixels it covers, so resizing an (s, s) image is A @ x @ A.T with a constant (t, s) matrix A,
run as two matrix products (LiteRT's FullyConnected). It equals ResizeArea to 3e-7 (tested), so
the exported model is the same version, not a new one. The export is checked against the Keras
model on sample cells before it is written, and the card records the largest logit difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dxserve.runtime import sha256_of

LITERT_FILE = "model.tflite"


def area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32: row i averages the input pixels under output pixel i, each
    weighted by the fraction of it that the output pixel covers (TensorFlow's ResizeArea)."""
    scale = size_in / size_out
    matrix = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        start, end = i * scale, (i + 1) * scale
        for j in range(int(np.floor(start)), min(int(np.ceil(end)), size_in)):
            matrix[i, j] = (min(end, j + 1) - max(start, j)) / scale
    return matrix.astype(np.float32)


def area_resize(images, size_out: int):
    """(n, s, s, c) float images -> (n, size_out, size_out, c), as ResizeArea, with matrix products only."""
    import tensorflow as tf

    size_in, channels = int(images.shape[1]), int(images.shape[3])
    transposed = tf.constant(area_matrix(size_in, size_out).T)
    n = tf.shape(images)[0]
    x = tf.transpose(images, (0, 2, 3, 1))  # n, width, c, height
    x = tf.reshape(tf.reshape(x, (-1, size_in)) @ transposed, (n, size_in, channels, size_out))  # heights resized
    x = tf.transpose(x, (0, 3, 2, 1))  # n, height', c, width
    x = tf.reshape(tf.reshape(x, (-1, size_in)) @ transposed, (n, size_out, channels, size_out))  # widths resized
    return tf.transpose(x, (0, 1, 3, 2))


def single_view_function(model, scales: list[int]):
    """A tf.function (uint8 cell, log diameter) -> (logit, features) built from `model`'s own
    layers (`model.build_classifier`'s structure), the area resize as `area_resize`."""
    import tensorflow as tf

    from .model import FEATURE_LAYERS

    size = int(model.get_layer("to_symmetric").input.shape[1])
    backbone, features, head = model.get_layer("backbone"), model.get_layer("features"), model.get_layer("head")

    def forward(cell, log_diameter):
        x = model.get_layer("to_symmetric")(tf.cast(cell, tf.float32) / 255.0)
        pooled = []
        for scale in sorted(scales, key=lambda s: s != size):  # the full size first, as feature_extractor orders them
            scaled = x if scale == size else area_resize(x, scale)
            pooled += [model.get_layer(f"pool_{scale}_{name}")(out) for name, out in zip(FEATURE_LAYERS, backbone(scaled, training=False), strict=True)]
        joined = features(pooled)
        return head({"features": joined, "log_diameter": log_diameter}, training=False), joined

    signature = [tf.TensorSpec((None, size, size, 3), tf.uint8, name="cell"), tf.TensorSpec((None, 1), tf.float32, name="log_diameter")]
    return tf.function(forward, input_signature=signature, autograph=False)


def export(version_dir: Path, card: dict, sample: np.ndarray | None = None, seed: int = 0) -> dict:
    """Write `model.tflite` for the version in `version_dir` and return the card's `litert` entry.
    `sample`: uint8 cells (n, s, s, 3) to check the export on (default: 24 random images)."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from . import model as _registers_custom_layers  # noqa: F401
    from .litert import LiteRTModel

    keras_model = keras.models.load_model(version_dir / card["weights"]["file"], compile=False)
    function = single_view_function(keras_model, card["training"]["scales"])
    # Frozen first (as plugin.frozen does): left to the converter, a two-head model kept one
    # variable as READ_VARIABLE, which LiteRT read uninitialised (NaN logits).
    frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    path = version_dir / LITERT_FILE
    path.write_bytes(converter.convert())

    size = int(card["input"]["image_size"])
    if sample is None:
        sample = np.random.default_rng(seed).integers(0, 256, (24, size, size, 3), dtype=np.uint8)
    log_diameters = np.full(len(sample), 5.0, np.float32)
    expected = np.asarray(keras_model({"cell": sample.astype(np.float32) / 255.0, "log_diameter": log_diameters[:, None]},
                                      training=False))[:, 0]
    got, _ = LiteRTModel(path, views=1)(sample, log_diameters)
    difference = float(np.abs(got - expected).max())
    if not difference <= 1e-3:  # NaN included
        path.unlink()
        raise RuntimeError(f"the LiteRT export of {version_dir.name} differs from its Keras model by {difference:g} in logit")
    return {"file": LITERT_FILE, "sha256": sha256_of(path), "bytes": path.stat().st_size,
            "converted_with": f"tensorflow {tf.__version__}",
            "max_abs_logit_difference": difference,
            "checked_on": f"{len(sample)} images against the Keras model, one view each"}
