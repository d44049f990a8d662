"""Issue 33, third round: the cell's box in the field (the strongest frozen input of
`site_aria_native.py`) through a network whose batch-norm statistics are the site's (AdaBN, the
gain of `site_aria_adabn.py`). Do the two gains add up? Research: nothing here is shipped;
RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_aria_box_adabn.py [--gap 20]

Same cells (the site profile), splits (5 contiguous number blocks per class; fit on block b,
score the others, less the fields within --gap numbers of block b's), draws and logistic heads as
`site_aria.py`; needs the caches of `site_aria_native.py` and `site_aria_adabn.py`. For each
split b, the ImageNet MobileNet (alpha 0.25, `../shared/weights`) gets the batch-norm statistics
of block b's boxes (512 of them, the box and its mirror image, no label), and every box's pooled
features are computed again through it. Scored: box features on ImageNet's statistics and on the
site's, each alone and beside the served graph's site-statistics features (`site_aria_adabn.py`),
with the colour, background and size baselines in the same splits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import site_aria as aria  # noqa: E402
from site_aria_native import box_crop, field_cells  # noqa: E402

SAMPLE, BATCH = 512, 64


def imagenet_mobilenet(weights: Path, size: int = 224):
    import keras

    return keras.applications.MobileNet(input_shape=(size, size, 3), alpha=0.25, include_top=False, weights=str(weights),
                                        pooling="avg")


def with_site_statistics(base, boxes: np.ndarray, seed: int = 0):
    """A copy of `base` whose batch-norm layers hold the mean and variance of `boxes` (512 of them,
    and their mirror images), layer after layer, as `adapt` re-estimates 2.1.0's (`adabn.py`)."""
    import keras

    from dxserve_lymphoblast.adabn import with_statistics_of

    chosen = boxes[np.sort(np.random.default_rng(seed).choice(len(boxes), min(SAMPLE, len(boxes)), replace=False))]
    halves = (chosen[start:start + BATCH // 2] for start in range(0, len(chosen), BATCH // 2))
    return with_statistics_of(base, (keras.applications.mobilenet.preprocess_input(
        np.concatenate([part, part[:, :, ::-1]]).astype(np.float32)) for part in halves))


def pooled(net, images: np.ndarray, views: int = 1, batch: int = BATCH) -> np.ndarray:
    """(n, d) outputs of `net` on uint8 images (MobileNet's preprocessing), averaged over the first
    `views` orientations (`features.view`)."""
    import keras

    from dxserve_lymphoblast.features import view

    return np.mean([np.concatenate([np.asarray(net(keras.applications.mobilenet.preprocess_input(
        view(images[s:s + batch], k).astype(np.float32)), training=False))
        for s in range(0, len(images), batch)]) for k in range(views)], axis=0)


def main() -> None:
    args = aria.arguments(__doc__, "site_aria_box_adabn")
    adabn, rows = aria.cached(args.cache / "site_aria_adabn.npz")
    native = dict(np.load(args.cache / "site_aria_native.npz"))
    found = [r for r in rows if r["cell"] >= 0]
    y, block = np.array([r["label"] == "blast" for r in found], int), aria.blocks(found)
    stored = args.cache / "site_aria_box_adabn.npz"
    if stored.exists():
        data = dict(np.load(stored))
    else:
        aria.log("Aria: finding cells again (the site_aria.py detector), their boxes in the field")
        keys, boxes = [], []
        for r, _, i, rgb, cell in field_cells(args.shared / "data" / "aria-taleqani"):
            keys.append((r["path"], i))
            boxes.append(box_crop(rgb, cell.box))
        if keys != [(r["path"], r["cell"]) for r in found]:
            raise SystemExit("the detector found other cells than the caches': rerun site_aria.py and its followers")
        boxes = np.stack(boxes)
        base = imagenet_mobilenet(args.shared / "weights" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5")
        data = {"imagenet": pooled(base, boxes)}
        aria.log(f"{len(boxes)} boxes; ImageNet statistics: max difference from site_aria_native's cache "
                 f"{np.abs(data['imagenet'] - native['imagenet_box']).max():.2e}")
        for b in range(aria.BLOCKS):
            data[f"adabn/{b}"] = pooled(with_site_statistics(base, boxes[block == b]), boxes)
            aria.log(f"split {b}: statistics of {int((block == b).sum())} boxes")
        np.savez(stored, **data)
    size = adabn["log_diameter"][:, None]
    served = {b: adabn[f"adabn/{b}"].mean(axis=1) for b in range(aria.BLOCKS)}
    left_out = {b: aria.near(found, block, b, args.gap) for b in range(aria.BLOCKS)} if args.gap else None
    report = {"cells": len(found), "gap": args.gap, "curve": aria.curve({
        "box, ImageNet statistics": data["imagenet"],
        "box, site statistics": {b: data[f"adabn/{b}"] for b in range(aria.BLOCKS)},
        "served graph, site statistics + size": {b: np.column_stack([served[b], size]) for b in range(aria.BLOCKS)},
        "box + served graph, site statistics + size": {b: np.column_stack([data[f"adabn/{b}"], served[b], size])
                                                       for b in range(aria.BLOCKS)},
        "size alone": size, "cell colour alone": adabn["mean_rgb"], "background alone": adabn["background"]},
        y, block, "", aria.log, left_out=left_out)}
    args.out.write_text(json.dumps(report, indent=1))
    aria.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
