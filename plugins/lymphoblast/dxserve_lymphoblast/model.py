"""The lymphoblast classifier: a convolutional feature extractor and an MLP head, in Keras."""

from __future__ import annotations

import keras
from keras import layers, ops

from .preprocess import BACKGROUND_MAX

# The single logit is for "lymphoblast" (plugin.LABELS): sigmoid(logit / T) = P(lymphoblast).
# Faster-moving batch-norm statistics than Keras' 0.99: with ~60 steps an epoch, 0.99 lags
# so far behind the weights that validation losses swing wildly in early epochs.
BN_MOMENTUM = 0.9


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


def conv_block(x, filters: int, name: str):
    """Two 3x3 convolutions with batch norm and ReLU, then 2x2 max pooling."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return layers.MaxPooling2D(name=f"{name}_pool")(x)


def build_model(
    image_size: int = 96,
    stem: int = 24,
    widths: tuple[int, ...] = (32, 64, 128, 192),
    mlp_units: int = 128,
    dropout: float = 0.4,
    reference_colour: tuple[float, float, float] = (0.5, 0.33, 0.56),
    log_diameter_stats: tuple[float, float] = (5.0, 0.25),
    grey: bool = False,
) -> keras.Model:
    """CNN feature extractor (conv blocks + global average pooling) and an MLP classifier.

    Inputs: "cell", float32 (image_size, image_size, 3) in [0, 1], as `preprocess.prepare`
    makes it; "log_diameter", (1,), as `preprocess.log_diameter` measures it, standardised
    with the training set's (mean, std) and joined to the CNN features before the MLP.
    Output: one logit; sigmoid(logit / temperature) is the calibrated P(lymphoblast).
    """
    image = keras.Input((image_size, image_size, 3), name="cell")
    log_diameter = keras.Input((1,), name="log_diameter")
    x = StainNormalisation(reference_colour, name="stain_normalisation")(image)
    if grey:
        x = Greyscale(name="greyscale")(x)
    x = layers.Rescaling(2.0, offset=-1.0, name="to_symmetric")(x)
    # A strided stem halves the resolution before the costly blocks: on a 2-core CPU it is
    # the difference between ~70 s and ~20 s an epoch, and texture survives at 48 px.
    x = layers.Conv2D(stem, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, filters in enumerate(widths):
        x = conv_block(x, filters, name=f"block{i + 1}")
    features = layers.GlobalAveragePooling2D(name="features")(x)
    size = layers.Normalization(mean=log_diameter_stats[0], variance=log_diameter_stats[1] ** 2, name="size")(log_diameter)
    x = layers.Dropout(dropout, name="mlp_dropout1")(features)
    x = layers.Concatenate(name="features_and_size")([x, size])
    x = layers.Dense(mlp_units, activation="relu", name="mlp_hidden")(x)
    x = layers.Dropout(dropout, name="mlp_dropout2")(x)
    logit = layers.Dense(1, name="logit")(x)
    return keras.Model({"cell": image, "log_diameter": log_diameter}, logit, name="lymphoblast_cnn_mlp")
