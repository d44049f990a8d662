"""Issue 33: does averaging weights help a CNN fine-tuned on one block of Aria rank the other
blocks' cells? Research: nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_aria_averaged.py --gap 20 [--sizes 100] [--scored 1500]

Fine-tuning on 100 cells of one block reaches 0.870 per cell on the other blocks (the mean over
5 splits, `site_aria_finetune.py`); what it learns of one block's slides is what fails to carry.
Two averages in weight space that cost nothing at serving time (one network, as before) are known
to hold better off the training distribution:
- `swa`: the mean of the weights after each epoch of the schedule's second half (stochastic weight
  averaging, Izmailov et al. 2018; SWAD, Cha et al. 2021, for domain generalisation);
- `wise`: halfway between the weights fine-tuning started from (the site-statistics network with
  its logistic head: the frozen reference) and those it ended at (WiSE-FT, Wortsman et al. 2022);
- `wise_swa`: halfway between the start and `swa`.
Batch norm is frozen at the block's statistics throughout, so every average keeps them.

Same cells, splits, gap, labelled draws, schedule (40 epochs, Adam 1e-4) and seeds as
`site_aria_finetune.py`; each split's scored cells are a fixed random --scored of the other
blocks' cells (less the fields within --gap numbers of block b's), the same for every variant,
so the variants are compared on the same cells.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import site_aria as aria  # noqa: E402
from site_aria_box_adabn import imagenet_mobilenet, pooled, with_site_statistics  # noqa: E402
from site_aria_finetune import DRAWS, cached_cells, frozen_head, summarise, tuned_model  # noqa: E402

VARIANTS = ("final", "swa", "wise", "wise_swa")


class Averages:
    """`after_epoch` for `tuned_model`: keeps the starting weights and the running mean of the
    weights after each epoch from `first` on."""

    def __init__(self, first: int):
        self.first, self.start, self.sum, self.count = first, None, None, 0

    def __call__(self, model, epoch: int) -> None:
        if epoch < 0:
            self.start = [np.array(w) for w in model.get_weights()]
        elif epoch >= self.first:
            weights = model.get_weights()
            self.sum = [np.array(w, np.float64) for w in weights] if self.sum is None else [s + w for s, w in zip(self.sum, weights)]
            self.count += 1

    def variants(self, final: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        swa = [(s / self.count).astype(w.dtype) for s, w in zip(self.sum, final)]
        return {"final": final, "swa": swa,
                "wise": [(0.5 * a + 0.5 * b).astype(b.dtype) for a, b in zip(self.start, final)],
                "wise_swa": [(0.5 * a + 0.5 * b).astype(b.dtype) for a, b in zip(self.start, swa)]}


def main() -> None:
    def options(parser):
        parser.add_argument("--epochs", type=int, default=40)
        parser.add_argument("--lr", type=float, default=1e-4)
        parser.add_argument("--sizes", type=int, nargs="+", default=[100])
        parser.add_argument("--scored", type=int, default=1500, help="other blocks' cells scored a split (a fixed random draw)")

    args = aria.arguments(__doc__, "site_aria_averaged", options)
    cells, rows = cached_cells(args)
    y, block = np.array([r["label"] == "blast" for r in rows], int), aria.blocks(rows)
    base = imagenet_mobilenet(args.shared / "weights" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5")
    report = {"cells": len(rows), "gap": args.gap, "epochs": args.epochs, "lr": args.lr, "sizes": args.sizes,
              "scored": args.scored, "splits": []}
    for b in range(aria.BLOCKS):
        net = with_site_statistics(base, cells[block == b])
        train = np.flatnonzero(block == b)
        kept = ~aria.near(rows, block, b, args.gap) if args.gap else np.ones(len(rows), bool)
        others = np.flatnonzero((block != b) & kept)
        test = np.sort(np.random.default_rng(b).choice(others, min(args.scored, len(others)), replace=False))
        features = dict(zip(np.concatenate([train, test]), pooled(net, cells[np.concatenate([train, test])], views=2)))
        split = {"block": b, "scored": len(test), "blast_share": float(y[test].mean())}
        for n in args.sizes:
            scores = {"frozen": [], **{v: [] for v in VARIANTS}}
            for draw in range(DRAWS):
                rng = np.random.default_rng(draw)
                picked = np.concatenate([rng.choice(train[y[train] == k], n // 2, replace=False) for k in (0, 1)])
                head = frozen_head(np.stack([features[i] for i in picked]), y[picked])
                scores["frozen"].append(aria.auroc(y[test], head.decision_function(np.stack([features[i] for i in test]))))
                averages = Averages(first=args.epochs // 2)
                model = tuned_model(net, head, cells[picked], y[picked], args.epochs, args.lr, draw, after_epoch=averages)
                for name, weights in averages.variants(model.get_weights()).items():
                    model.set_weights(weights)
                    scores[name].append(aria.auroc(y[test], pooled(model, cells[test], views=2)[:, 0]))
                aria.log(f"split {b} n={n} draw {draw}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items()))
            split[str(n)] = scores
        report["splits"].append(split)
        args.out.write_text(json.dumps(report, indent=1))
    summarise(report, ("frozen", *VARIANTS))
    aria.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
