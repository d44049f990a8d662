"""Export a 2.x version's Keras model to LiteRT (`model.tflite`), the served format.

Needs TensorFlow (`pip install dxserve-lymphoblast[train]`); serving does not.

The exported graph is one view of the cell: uint8 (n, s, s, 3) and its log diameter -> the logit
and the CNN features (`litert.py` averages the views). It is the Keras model's own weights and
layers, the uint8 cell cast in the graph, with two changes that leave the function the same (to
float rounding) and let XNNPACK run a view in 0.85-0.96 ms on 2 cores, against 1.09-1.15 ms for
the first export, which had neither (`benchmarks/RESULTS.md`, issue 30's second round):

- the smaller scales' area resize (`layers.Resizing(interpolation="area")`, TensorFlow's
  ResizeArea, which has no LiteRT kernel) is done as what it is, a linear map whose weights
  repeat: at 224 -> 128 every 7 input pixels give 4 output pixels, so it is one strided
  convolution and a DepthToSpace (`area_resize`); it equals ResizeArea to 3e-7 (tested);
- the scaling to MobileNet's [-1, 1] (`to_symmetric`) is folded into the first convolution:
  the pixels are only centred (x - 127.5) and conv1's kernel is divided by 127.5. conv1 has no
  bias and pads with zeros, which are the centred mid-grey either way, so nothing else changes
  (`centred_backbone`); three passes over every pixel are saved.

The export is checked against the Keras model on sample cells before it is written, and the
card records the largest logit difference.
"""

from __future__ import annotations

import math
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


def area_kernel(size_in: int, size_out: int, channels: int) -> np.ndarray:
    """The area resize as a convolution kernel (p, p, c, q * q * c): with size_in / size_out = p / q
    in lowest terms, each p x p block of input pixels gives q x q output pixels with the same
    weights (`area_matrix`'s first block, outer product of rows and columns); output pixel (r, s)
    of a block, channel k, is output channel (r * q + s) * c + k, DepthToSpace's order."""
    divisor = math.gcd(size_in, size_out)
    p, q = size_in // divisor, size_out // divisor
    block = area_matrix(size_in, size_out)[:q, :p]
    kernel = np.zeros((p, p, channels, q * q * channels), np.float32)
    for r in range(q):
        for s in range(q):
            for k in range(channels):
                kernel[:, :, k, (r * q + s) * channels + k] = np.outer(block[r], block[s])
    return kernel


#: The longest run of input pixels whose weights repeat (p) that `area_resize` makes a convolution of.
MAX_PERIOD = 16


def area_resize(images, size_out: int):
    """(n, s, s, c) float images -> (n, size_out, size_out, c), as ResizeArea: one convolution with
    `area_kernel`, stride p, then DepthToSpace(q) puts each block's q x q pixels in place. Where
    the weights repeat only over more than MAX_PERIOD pixels (e.g. 224 -> 97, p = 224), as two
    products with `area_matrix` (LiteRT's FullyConnected) instead: slower, the same result."""
    import tensorflow as tf

    size_in, channels = int(images.shape[1]), int(images.shape[3])
    if size_in // math.gcd(size_in, size_out) > MAX_PERIOD:
        transposed, n = tf.constant(area_matrix(size_in, size_out).T), tf.shape(images)[0]
        x = tf.transpose(images, (0, 2, 3, 1))  # n, width, c, height
        x = tf.reshape(tf.reshape(x, (-1, size_in)) @ transposed, (n, size_in, channels, size_out))  # heights resized
        x = tf.transpose(x, (0, 3, 2, 1))  # n, height', c, width
        x = tf.reshape(tf.reshape(x, (-1, size_in)) @ transposed, (n, size_out, channels, size_out))  # widths resized
        return tf.transpose(x, (0, 1, 3, 2))
    kernel = area_kernel(size_in, size_out, channels)
    stride, block = kernel.shape[0], math.isqrt(kernel.shape[3] // channels)
    blocks = tf.nn.conv2d(images, tf.constant(kernel), strides=stride, padding="VALID")
    return tf.nn.depth_to_space(blocks, block) if block > 1 else blocks


def centred_backbone(backbone, conv1_kernel: np.ndarray):
    """MobileNet on centred pixels (x - 127.5, x in [0, 255]) -> its FEATURE_LAYERS outputs, equal
    to `backbone` on x / 127.5 - 1 (`to_symmetric` of x / 255): conv1 (3x3, stride 2, "same"
    zero padding, no bias) runs with its kernel divided by 127.5, then the backbone's own layers
    after it, in order (MobileNet v1 is a chain of layers)."""
    import tensorflow as tf

    from .model import FEATURE_LAYERS

    conv1 = backbone.get_layer("conv1")
    if conv1.use_bias or conv1.padding != "same" or backbone.layers[1] is not conv1:
        raise ValueError("the backbone does not start with MobileNet v1's conv1 (no bias, 'same' zero padding)")
    kernel, strides = tf.constant(conv1_kernel / 127.5), conv1.strides

    def forward(centred):
        x, outputs = tf.nn.conv2d(centred, kernel, strides=strides, padding="SAME"), {}
        for layer in backbone.layers[2:]:
            x = layer(x, training=False)
            outputs[layer.name] = x
        return [outputs[name] for name in FEATURE_LAYERS]

    return forward


def single_view_function(model, scales: list[int], backbones: dict | None = None):
    """A tf.function (uint8 cell, log diameter) -> (logit, features) built from `model`'s own
    layers (`model.build_classifier`'s structure): centred pixels, the area resize as
    `area_resize`, the backbone as `centred_backbone`. `backbones`: a backbone per scale in place
    of the model's shared one (a site version's, with its own batch-norm statistics: `adabn.py`)."""
    import tensorflow as tf

    from .model import FEATURE_LAYERS

    to_symmetric = model.get_layer("to_symmetric")
    if (to_symmetric.scale, to_symmetric.offset) != (2.0, -1.0):
        raise ValueError("to_symmetric is not MobileNet's [-1, 1] scaling of [0, 1] pixels")
    size = int(to_symmetric.input.shape[1])
    features, head = model.get_layer("features"), model.get_layer("head")
    chosen = {scale: (backbones or {}).get(scale, model.get_layer("backbone")) for scale in scales}
    centred = {scale: centred_backbone(b, np.asarray(b.get_layer("conv1").kernel)) for scale, b in chosen.items()}

    def forward(cell, log_diameter):
        x = tf.cast(cell, tf.float32) - 127.5
        pooled = []
        for scale in sorted(scales, key=lambda s: s != size):  # the full size first, as feature_extractor orders them
            scaled = x if scale == size else area_resize(x, scale)  # the resize's weights sum to 1: centring commutes
            pooled += [model.get_layer(f"pool_{scale}_{name}")(out) for name, out in zip(FEATURE_LAYERS, centred[scale](scaled), strict=True)]
        joined = features(pooled)
        return head({"features": joined, "log_diameter": log_diameter}, training=False), joined

    signature = [tf.TensorSpec((None, size, size, 3), tf.uint8, name="cell"), tf.TensorSpec((None, 1), tf.float32, name="log_diameter")]
    return tf.function(forward, input_signature=signature, autograph=False)


def converted(function) -> bytes:
    """A `single_view_function` as LiteRT flatbuffer bytes. Frozen first (as plugin.frozen does):
    left to the converter, a two-head model kept one variable as READ_VARIABLE, which LiteRT read
    uninitialised (NaN logits)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    return tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()


def export(version_dir: Path, card: dict, sample: np.ndarray | None = None, seed: int = 0) -> dict:
    """Write `model.tflite` for the version in `version_dir` and return the card's `litert` entry.
    `sample`: uint8 cells (n, s, s, 3) to check the export on (default: 24 random images)."""
    import keras
    import tensorflow as tf

    from . import model as _registers_custom_layers  # noqa: F401
    from .litert import LiteRTModel

    keras_model = keras.models.load_model(version_dir / card["weights"]["file"], compile=False)
    path = version_dir / LITERT_FILE
    path.write_bytes(converted(single_view_function(keras_model, card["training"]["scales"])))

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
