"""Issue 33, 25 labelled cells: does the onboarding block's unlabelled cells' own structure lift a
head on frozen features (0.747 per cell on the other blocks, fine-tuned 0.778, the issue asks
0.90)? Self-training: the head fitted on the labelled cells labels the block's other cells, the
most confident of each predicted class join the labelled ones, and the head is fitted again,
a larger share each round. Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_aria_selftrain.py [--gap 20] [--sizes 25 100] [--rounds 5]

Same cells, splits, gap, labelled draws and features as `site_aria_finetune.py`'s frozen
reference (the ImageNet MobileNet with block b's batch-norm statistics, 2 orientations pooled, a
logistic head C = 0.05 on standardised features); scored per cell on the other blocks. Beside
it, in the same draws: the same head fitted on every cell of block b with its true label (what
labelling the whole block would give: the ceiling of any use of its unlabelled cells).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import site_aria as aria  # noqa: E402
from site_aria_box_adabn import imagenet_mobilenet, pooled, with_site_statistics  # noqa: E402
from site_aria_finetune import DRAWS, SIZES, cached_cells, frozen_head, summarise  # noqa: E402


def self_trained(x_labelled, y_labelled, x_pool, rounds: int):
    """The head after `rounds` rounds; round r adds the r/rounds most confident of each class the
    head of round r - 1 predicts in the pool (ranked by its logit), weighted so the pseudo-labelled
    cells together count as much as the labelled ones."""
    fitted = frozen_head(x_labelled, y_labelled)
    for r in range(1, rounds + 1):
        z = fitted.decision_function(x_pool)
        picked, guessed = [], []
        for cls, side in ((1, z >= 0), (0, z < 0)):
            order = np.flatnonzero(side)[np.argsort(-np.abs(z[side]))]
            keep = order[: int(len(order) * r / rounds)]
            picked.append(keep)
            guessed.append(np.full(len(keep), cls))
        picked, guessed = np.concatenate(picked), np.concatenate(guessed)
        weight = np.concatenate([np.ones(len(y_labelled)), np.full(len(picked), len(y_labelled) / max(1, len(picked)))])
        fitted = frozen_head(np.concatenate([x_labelled, x_pool[picked]]), np.concatenate([y_labelled, guessed]), weight)
    return fitted


def main() -> None:
    def options(parser):
        parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
        parser.add_argument("--rounds", type=int, default=5)

    args = aria.arguments(__doc__, "site_aria_selftrain", options)
    cells, rows = cached_cells(args)
    y, block = np.array([r["label"] == "blast" for r in rows], int), aria.blocks(rows)
    base = imagenet_mobilenet(args.shared / "weights" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5")
    report = {"cells": len(rows), "gap": args.gap, "rounds": args.rounds, "sizes": args.sizes, "splits": []}
    for b in range(aria.BLOCKS):
        features_file = args.cache / f"site_aria_selftrain_features_{b}.npy"
        if features_file.exists():
            features = np.load(features_file)
        else:
            features = pooled(with_site_statistics(base, cells[block == b]), cells, views=2)
            np.save(features_file, features)
        train = np.flatnonzero(block == b)
        kept = ~aria.near(rows, block, b, args.gap) if args.gap else np.ones(len(rows), bool)
        test = np.flatnonzero((block != b) & kept)
        whole = aria.auroc(y[test], frozen_head(features[train], y[train]).decision_function(features[test]))
        split = {"block": b, "scored": len(test), "whole block labelled": whole}
        for n in args.sizes:
            frozen, selfed = [], []
            for draw in range(DRAWS):
                rng = np.random.default_rng(draw)
                picked = np.concatenate([rng.choice(train[y[train] == k], n // 2, replace=False) for k in (0, 1)])
                pool = np.setdiff1d(train, picked)
                frozen.append(aria.auroc(y[test], frozen_head(features[picked], y[picked]).decision_function(features[test])))
                fitted = self_trained(features[picked], y[picked], features[pool], args.rounds)
                selfed.append(aria.auroc(y[test], fitted.decision_function(features[test])))
                aria.log(f"split {b} n={n} draw {draw}: frozen {frozen[-1]:.3f}, self-trained {selfed[-1]:.3f}, "
                         f"whole block labelled {whole:.3f}")
            split[str(n)] = {"frozen": frozen, "self_trained": selfed}
        report["splits"].append(split)
        args.out.write_text(json.dumps(report, indent=1))
    summarise(report, ("frozen", "self_trained"))
    per = [s["whole block labelled"] for s in report["splits"]]
    aria.log(f"whole block labelled per split {' '.join(f'{a:.3f}' for a in per)} mean {np.mean(per):.3f}")
    aria.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
