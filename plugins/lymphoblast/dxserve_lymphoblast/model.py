"""The lymphoblast classifier: a pretrained CNN feature extractor and an MLP head, in Keras.

2.x: ImageNet MobileNet features of the cell at two scales + the log cell diameter -> MLP.
The 1.x models (a small CNN trained from scratch, recipe in git history before 2.0.0)
still load: their custom layers, `StainNormalisation` and `Greyscale`, stay registered here.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from .preprocess import BACKGROUND_MAX

# Backbone layers whose globally pooled activations are the CNN features (2.x models): the
# last block (256 channels, 1/32 of the input) and the one before the final downsampling
# (128 channels, 1/16): finer chromatin texture survives in the latter.
FEATURE_LAYERS = ("conv_pw_11_relu", "conv_pw_13_relu")


@keras.saving.register_keras_serializable(package="dxserve_lymphoblast")
class StainNormalisation(layers.Layer):
    """Rescale each colour channel so the cell's mean colour equals `reference`.

    A grey-world normalisation restricted to the cell (pixels brighter than the black
    background): it cancels global stain and white-balance shifts between laboratories
    while keeping texture and relative colour. Part of the model so that training,
    augmentation and serving share it.
    """

    def __init__(self, reference: tuple[float, float, float], threshold: float = BACKGROUND_MAX / 255, **kwargs):
        super().__init__(**kwargs)
        self.reference = tuple(float(v) for v in reference)
        self.threshold = float(threshold)

    def call(self, images):
        mask = ops.cast(ops.max(images, axis=-1, keepdims=True) > self.threshold, images.dtype)
        count = ops.maximum(ops.sum(mask, axis=(1, 2)), 1.0)
        mean = ops.sum(images * mask, axis=(1, 2)) / count  # (batch, 3)
        gain = ops.clip(ops.convert_to_tensor(self.reference) / ops.maximum(mean, 1e-3), 0.25, 4.0)
        return ops.clip(images * gain[:, None, None, :], 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "reference": self.reference, "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="dxserve_lymphoblast")
class Greyscale(layers.Layer):
    """Mean of the (stain-normalised) channels: leaves the CNN shape and chromatin texture,
    not the hue, which in C-NMC varies more between subjects and labs than between classes."""

    def call(self, images):
        return ops.mean(images, axis=-1, keepdims=True)


# Channels of each FEATURE_LAYERS output in MobileNet alpha 0.25, and where the full-size
# scale's last-block features lie in `feature_extractor`'s output (the full size comes first).
FEATURE_CHANNELS = (128, 256)
LAST_BLOCK_FEATURES = slice(FEATURE_CHANNELS[0], sum(FEATURE_CHANNELS))


def feature_extractor(cell, weights, scales: tuple[int, ...] | None = None):
    """Pretrained CNN features of `cell` (float (s, s, 3) in [0, 1]): one ImageNet MobileNet
    applied to the cell at each of `scales` (default: its own size); at each, the
    activations of FEATURE_LAYERS globally average-pooled; all of them joined.

    Smaller scales show the whole cell's shape to the backbone's receptive field, the full
    size keeps the chromatin texture. `weights`: the verified ImageNet file
    (`backbone.imagenet_weights`) or None (random; the trained values then come from a
    saved model). No stain normalisation: in cross-validation it cost AUROC (the stain is
    already normalised by the data set's creators, and the cell's colour carries class signal).
    """
    from .backbone import build_backbone

    size = cell.shape[1]
    x = layers.Rescaling(2.0, offset=-1.0, name="to_symmetric")(cell)  # MobileNet's preprocess_input
    base = build_backbone(None, weights)
    backbone = keras.Model(base.inputs, [base.get_layer(n).output for n in FEATURE_LAYERS], name="backbone")
    pooled = []
    for scale in sorted(scales or (size,), key=lambda s: s != size):  # the full size first
        # "area" averages when shrinking, as preprocess.resize's box filter does.
        scaled = x if scale == size else layers.Resizing(scale, scale, interpolation="area", name=f"resize_{scale}")(x)
        pooled += [layers.GlobalAveragePooling2D(name=f"pool_{scale}_{n}")(m) for n, m in zip(FEATURE_LAYERS, backbone(scaled), strict=True)]
    return layers.Concatenate(name="features")(pooled)


def build_head(feature_dim: int, mlp_units: int = 64, dropout: float = 0.3, log_diameter_stats: tuple[float, float] | None = (5.0, 0.25),
               feature_stats: tuple | None = None) -> keras.Model:
    """The MLP classifier on the CNN features: (features, log_diameter) -> one logit, for
    "lymphoblast" (plugin.LABELS): sigmoid(logit / T) is the calibrated P(lymphoblast).

    `feature_stats` (mean, std) per feature standardises the frozen features (the
    backbone's activations span very different ranges); `log_diameter_stats` adds the cell's
    standardised log diameter as an explicit input, or None to leave size out.
    """
    features = keras.Input((feature_dim,), name="features")
    log_diameter = keras.Input((1,), name="log_diameter")
    x = features
    if feature_stats is not None:
        x = layers.Normalization(mean=feature_stats[0], variance=feature_stats[1] ** 2, name="feature_scaling")(x)
    x = layers.Dropout(dropout, name="mlp_dropout1")(x)
    if log_diameter_stats is not None:
        size = layers.Normalization(mean=log_diameter_stats[0], variance=log_diameter_stats[1] ** 2, name="size")(log_diameter)
        x = layers.Concatenate(name="features_and_size")([x, size])
    if mlp_units:
        x = layers.Dense(mlp_units, activation="relu", name="mlp_hidden")(x)
        x = layers.Dropout(dropout, name="mlp_dropout2")(x)
    logit = layers.Dense(1, name="logit")(x)
    return keras.Model({"features": features, "log_diameter": log_diameter}, logit, name="head")


def averaged_heads(heads: list[keras.Model]) -> keras.Model:
    """One head (as `build_head` makes them) whose logit is the mean of `heads`' logits: an
    ensemble over one backbone pass, as cheap to serve as one head (each is a small MLP)."""
    dim = next(t.shape[1] for t in heads[0].inputs if t.name == "features")
    features, log_diameter = keras.Input((dim,), name="features"), keras.Input((1,), name="log_diameter")
    logits = []
    for i, head in enumerate(heads):
        head.name = f"head_{i}"  # distinct names inside one model
        logits.append(head({"features": features, "log_diameter": log_diameter}))
    return keras.Model({"features": features, "log_diameter": log_diameter}, layers.Average(name="mean_logit")(logits), name="head")


def build_classifier(image_size: int, head: keras.Model, weights=None, scales: tuple[int, ...] | None = None) -> keras.Model:
    """The served model: cell image -> pretrained CNN features -> `head` (with the log diameter) -> logit.

    Inputs as `preprocess.model_input` makes them: "cell", float32 (s, s, 3) in [0, 1];
    "log_diameter", (1,). sigmoid(logit / temperature) is the calibrated P(lymphoblast).
    """
    cell = keras.Input((image_size, image_size, 3), name="cell")
    log_diameter = keras.Input((1,), name="log_diameter")
    features = feature_extractor(cell, weights, scales)
    logit = head({"features": features, "log_diameter": log_diameter})
    return keras.Model({"cell": cell, "log_diameter": log_diameter}, logit, name="lymphoblast_mobilenet_mlp")
