"""Issue 33: does fine-tuning the CNN on the site's labelled cells get past what a head on frozen
features reaches (0.83-0.87 at 100 cells on Aria)? Research: nothing here is shipped; RESULTS.md
says what it measured.

    python plugins/lymphoblast/experiments/site_aria_finetune.py [--gap 20] [--epochs 40] [--lr 1e-4] [--sizes 25 100] [--jitter] [--splits 0 1 2 3 4] [--size 224] [--frozen-below conv_dw_7]

(--sizes 0: every cell of block b labelled, one draw: the ceiling of labelling more of the block.)

Same cells (smear-field with the site profile, as `site_aria.py`), each as the served model sees
it (`prepare`: the cell on black, 224 px), same splits (5 contiguous number blocks per class; fit
on block b, score the others less the fields within --gap numbers of block b's) and the same
labelled draws. For each split and size:
- the ImageNet MobileNet (alpha 0.25) with the batch-norm statistics of block b's cells (AdaBN,
  as `adapt` does), a logistic head on its pooled features: the frozen reference;
- the same network fine-tuned end to end on the labelled cells (batch-norm statistics kept
  frozen, the head started from the logistic one), the 8 orientations as augmentation, Adam at
  --lr for --epochs (batches of 16); scored as the reference is, on 2 orientations averaged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import site_aria as aria  # noqa: E402
from site_aria_box_adabn import imagenet_mobilenet, pooled, with_site_statistics  # noqa: E402

SIZES = (25, 100)
DRAWS = 2


def served_cells(root: Path) -> tuple[np.ndarray, list[dict]]:
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version

    crops, rows = aria.aria_cells(root)
    runtime = LymphoblastRuntime(find_version("2.1.0"))
    runtime.load()
    return np.stack([runtime.prepare(c)[0]["cell"] for c in crops]), [r for r in rows if r["cell"] >= 0]


def cached_cells(args) -> tuple[np.ndarray, list[dict]]:
    """`served_cells`, from the experiments' cache (found and cached on the first run)."""
    stored = args.cache / "site_aria_finetune_cells.npz"
    if (found := aria.cached(stored)) is not None:
        return found[0]["cells"], found[1]
    aria.log("Aria: finding cells (site profile), prepared as 2.1.0 serves them")
    cells, rows = served_cells(args.shared / "data" / "aria-taleqani")
    np.savez(stored, cells=cells, rows=np.array(json.dumps(rows)))
    return cells, rows


def frozen_head(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None):
    """The frozen reference's head: a logistic regression (C = 0.05) on standardised features, each
    row weighted `weight` times (none: once)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)).fit(
        x, y, logisticregression__sample_weight=weight)


def colour_jitter(seed: int):
    """Keras's colour jitter for cells in [0, 255]: brightness +-10 % of the range, contrast
    0.8-1.2, saturation 0.7-1.3, hue +-0.05 of the circle (18 degrees), each drawn per cell."""
    import keras

    return keras.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=0.1, contrast_factor=0.2,
                                          saturation_factor=(0.35, 0.65), hue_factor=0.1, seed=seed)


def recoloured(jitter, cells: np.ndarray) -> np.ndarray:
    """float32 cells in [0, 255] through `jitter`, the black around a segmented cell kept black."""
    inside = cells.max(axis=-1, keepdims=True) > 12
    changed = np.clip(np.asarray(jitter(cells.astype(np.float32), training=True)), 0, 255)
    return np.where(inside, changed, 0).astype(np.float32)


def fine_tuned(net, head, cells: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int, jitter: bool = False,
               frozen_below: str | None = None):
    """A copy of `net` (batch norm frozen) with a dense head started from `head` (a fitted
    StandardScaler + LogisticRegression pipeline), trained end to end on `cells`: its scores of
    cells, on 2 orientations averaged."""
    model = tuned_model(net, head, cells, y, epochs, lr, seed, jitter, frozen_below=frozen_below)
    return lambda c: pooled(model, c, views=2)[:, 0]


def tuned_model(net, head, cells: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int, jitter: bool = False,
                after_epoch=None, frozen_below: str | None = None):
    """`fine_tuned`'s model itself; `after_epoch(model, epoch)` is called before the first epoch
    (epoch -1) and after each; the layers before the one named `frozen_below` (none: every layer
    trains) keep their ImageNet weights."""
    import keras

    from dxserve_lymphoblast.finetune import oriented, trainable_copy

    keras.utils.set_random_seed(seed)
    backbone = trainable_copy(net)  # batch norm in inference mode: the site's statistics stay
    names = [layer.name for layer in backbone.layers]
    for layer in backbone.layers[:names.index(frozen_below) if frozen_below else 0]:
        layer.trainable = False
    scaler, logistic = head.named_steps["standardscaler"], head.named_steps["logisticregression"]
    w = logistic.coef_[0] / scaler.scale_
    dense = keras.layers.Dense(1)
    inputs = keras.Input(cells.shape[1:])
    logit = dense(keras.layers.Dropout(0.2)(backbone(inputs)))
    model = keras.Model(inputs, logit)
    dense.set_weights([w[:, None].astype(np.float32), np.array([logistic.intercept_[0] - (w * scaler.mean_).sum()], np.float32)])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    changed = colour_jitter(seed) if jitter else None
    if after_epoch is not None:
        after_epoch(model, -1)
    for epoch in range(epochs):
        order = rng.permutation(len(cells))
        for s in range(0, len(cells), 16):
            part = order[s:s + 16]
            batch = oriented(cells[part], np.array([rng.integers(8) for _ in part]))  # as drawn before --jitter
            batch = recoloured(changed, batch) if jitter else batch.astype(np.float32)
            model.train_on_batch(keras.applications.mobilenet.preprocess_input(batch), y[part].astype(np.float32)[:, None])
        if after_epoch is not None:
            after_epoch(model, epoch)
    return model


def main() -> None:
    def options(parser):
        parser.add_argument("--epochs", type=int, default=40)
        parser.add_argument("--lr", type=float, default=1e-4)
        parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
        parser.add_argument("--jitter", action="store_true", help="colour jitter each cell as it is trained on (colour_jitter above)")
        parser.add_argument("--size", type=int, default=224, help="the cells area-resized to SIZE px, the network at that input")
        parser.add_argument("--frozen-below", help="train only the layers from this one on (e.g. conv_dw_7); the earlier keep ImageNet's")
        parser.add_argument("--splits", type=int, nargs="+", default=list(range(aria.BLOCKS)), help="the fitting blocks to run")

    args = aria.arguments(__doc__, "site_aria_finetune", options)
    cells, rows = cached_cells(args)
    y, block = np.array([r["label"] == "blast" for r in rows], int), aria.blocks(rows)
    if args.size != cells.shape[1]:
        import tensorflow as tf

        cells = np.round(tf.image.resize(cells, (args.size, args.size), method="area").numpy()).astype(np.uint8)
    base = imagenet_mobilenet(args.shared / "weights" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5", args.size)
    report = {"cells": len(rows), "gap": args.gap, "epochs": args.epochs, "lr": args.lr, "jitter": args.jitter, "frozen_below": args.frozen_below, "sizes": args.sizes,
              "size": args.size, "splits": []}
    for b in args.splits:
        net = with_site_statistics(base, cells[block == b])
        features = pooled(net, cells, views=2)
        train = np.flatnonzero(block == b)
        kept = ~aria.near(rows, block, b, args.gap) if args.gap else np.ones(len(rows), bool)
        test = np.flatnonzero((block != b) & kept)
        split = {"block": b, "scored": len(test)}
        for n in args.sizes:
            frozen, tuned = [], []
            for draw in range(DRAWS if n else 1):  # n = 0: every cell of block b, labelled (a ceiling)
                rng = np.random.default_rng(draw)
                picked = (np.concatenate([rng.choice(train[y[train] == k], n // 2, replace=False) for k in (0, 1)])
                          if n else train)
                head = frozen_head(features[picked], y[picked])
                frozen.append(aria.auroc(y[test], head.decision_function(features[test])))
                score = fine_tuned(net, head, cells[picked], y[picked], args.epochs, args.lr, draw, args.jitter, args.frozen_below)
                tuned.append(aria.auroc(y[test], score(cells[test])))
                aria.log(f"split {b} n={n} draw {draw}: frozen {frozen[-1]:.3f}, fine-tuned {tuned[-1]:.3f}")
            split[str(n)] = {"frozen": frozen, "fine_tuned": tuned}
        report["splits"].append(split)
        args.out.write_text(json.dumps(report, indent=1))
    summarise(report, ("frozen", "fine_tuned"))
    aria.log(f"wrote {args.out}")


def summarise(report: dict, kinds: tuple[str, ...]) -> None:
    """Log each method's AUROC per split (the mean of its draws) and their mean, for each size."""
    for n in report["sizes"]:
        for kind in kinds:
            per = [float(np.mean(s[str(n)][kind])) for s in report["splits"]]
            aria.log(f"n={n} {kind:12s} per split {' '.join(f'{a:.3f}' for a in per)} mean {np.mean(per):.3f}")


if __name__ == "__main__":
    main()
