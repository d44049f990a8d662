"""A site's own batch-norm statistics for the frozen CNN (AdaBN), and its LiteRT graph.

The backbone's weights stay the parent's; only each batch-norm layer's mean and variance are
estimated again, on the site's cells (labelled or not: no label is used), once per scale the
parent applies the backbone at. Another lab's stain and camera shift every layer's activations;
re-estimated statistics bring them back to the range the next layer was trained for. On Aria's
cells (`experiments/site_aria_adabn.py`) a site head on the adapted features ranked held-out
blocks better than one on the parent's features in 19 of 20 (split, size) pairs (100 labelled
cells: 0.845 against 0.800, mean of 5 splits), while the parent's own head on adapted features
ranked worse (0.31-0.37): the statistics and a refitted head go together.

Needs TensorFlow (the training extra), as onboarding does; the result is served on LiteRT.
"""

from __future__ import annotations

import numpy as np

#: Cells the statistics are estimated on (drawn with a fixed seed), and images (cells x views) per
#: training-mode pass: a pass keeps every layer's activations, about 30 MB an image at 224 px.
SAMPLE = 512
BATCH = 64


def batch_norm_layers(backbone) -> list:
    import keras

    return [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]


def adapted_backbones(model, cells: np.ndarray, scales: list[int], views: int, sample: int = SAMPLE, batch: int = BATCH,
                      seed: int = 0) -> dict:
    """{scale: a copy of `model`'s backbone whose batch-norm statistics are those of `cells`
    (uint8 model inputs, n x s x s x 3) at that scale, in the version's `views`}.
    `batch`: images (cells x views) a pass."""
    from .litert import views_of

    shared, to_symmetric = model.get_layer("backbone"), model.get_layer("to_symmetric")
    size, batch = cells.shape[1], max(1, batch // views)  # cells a pass
    chosen = cells[np.sort(np.random.default_rng(seed).choice(len(cells), min(sample, len(cells)), replace=False))]

    def inputs(scale: int):
        for start in range(0, len(chosen), batch):
            x = to_symmetric(views_of(chosen[start:start + batch], views).astype(np.float32) / 255.0)
            yield x if scale == size else model.get_layer(f"resize_{scale}")(x)

    return {scale: with_statistics_of(shared, inputs(scale)) for scale in scales}


def with_statistics_of(backbone, batches):
    """A copy of `backbone` whose batch-norm layers hold the mean and variance of `batches` (the
    backbone's inputs, one array a pass). Each training-mode pass normalises every layer by its
    batch's own statistics, so each layer's statistics are taken on the previous layers' adapted
    outputs; with momentum (i - 1) / i at the i-th batch the stored values are the batches' average."""
    import keras

    adapted = keras.models.clone_model(backbone)
    adapted.set_weights(backbone.get_weights())
    layers = batch_norm_layers(adapted)
    momenta = [layer.momentum for layer in layers]
    for i, x in enumerate(batches, start=1):
        for layer in layers:
            layer.momentum = (i - 1) / i
        adapted(x, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return adapted


def site_graph(model, scales: list[int], backbones: dict, check: np.ndarray) -> tuple[bytes, float]:
    """The parent's single-view LiteRT graph (`export.single_view_function`) with `backbones`, as
    bytes, and the largest difference of its CNN features from TensorFlow's on the `check` cells
    (uint8 model inputs), relative to the largest feature; over 1e-3 is a RuntimeError. (Float
    rounding gave 1e-5 to 3e-4: a site's statistics can make features of any scale, and a channel
    of little variance amplifies rounding. A wrong graph differs by the order of the features.)"""
    from .export import converted, single_view_function
    from .litert import LiteRTModel

    function = single_view_function(model, scales, backbones)
    content = converted(function)
    sizes = np.full((len(check), 1), 5.0, np.float32)
    _, expected = function(check, sizes)
    _, got = LiteRTModel(content, views=1)(check, sizes[:, 0])
    expected = np.asarray(expected)
    difference = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-6))
    if not difference <= 1e-3:  # NaN included
        raise RuntimeError(f"the site's LiteRT graph differs from TensorFlow's by {difference:g} of its largest CNN feature")
    return content, difference
