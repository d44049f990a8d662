"""Issue 33: why `adaptation.level` reads each fold's logits at its own model's level. Research:
nothing here is shipped; RESULTS.md says what it measured.

    python plugins/lymphoblast/experiments/site_aria_levels.py [--cache DIR]

Aria's cells (`site_aria_adabn.py`'s cache: smear-field's cells, each block's AdaBN features) as
`adapt` sees them at a site: for each of the 5 blocks, 100 labelled cells of that block (50 per
class, seeded), grouped by 20 neighbouring fields in their class as `onboard_aria.py` groups
them (every group of one class), in `adapt`'s grouped folds (`folds_by_group`). Logistic
regressions on pure noise (3 columns, no information), on size alone, on colour alone and the
site head (`adaptation`'s C, on the block's AdaBN features and the log diameter) are scored out of
fold, pooled as they come and each fold's logits less its model's median on the block's other
(unlabelled) cells. A score that knows nothing should pool at 0.5.
"""

from __future__ import annotations

import json

import numpy as np

import site_aria as aria
from site_aria import log


def main() -> None:
    from dxserve_lymphoblast.adaptation import C, auroc, design, folds_by_group, level
    from dxserve_lymphoblast.baselines import fitted_logistic

    args = aria.arguments(__doc__, "site_aria_levels")
    found = aria.cached(args.cache / "site_aria_adabn.npz")
    if found is None:
        raise SystemExit("run site_aria_adabn.py first: its cache holds the cells' features")
    data, rows = found
    rows = [r for r in rows if r["cell"] >= 0]
    y_all, block = np.array([r["label"] == "blast" for r in rows], int), aria.blocks(rows)
    groups = np.array([f"{r['klass']}-{r['number'] // 20}" for r in rows])
    noise = np.random.default_rng(0).normal(size=(len(rows), 3))
    report = {"labelled": 100, "group_size": 20, "splits": []}
    for b in range(aria.BLOCKS):
        inputs = {"noise": (noise, 1.0), "size alone": (data["log_diameter"][:, None], 1.0), "colour alone": (data["mean_rgb"], 1.0),
                  "site head": (design(data[f"adabn/{b}"].astype(np.float64).mean(axis=1), data["log_diameter"]), C)}
        rng, here = np.random.default_rng(b), np.flatnonzero(block == b)
        picked = np.concatenate([rng.permutation(here[y_all[here] == k])[:50] for k in (0, 1)])
        unlabelled = np.setdiff1d(here, picked)
        y, folds = y_all[picked], folds_by_group(groups[picked], y_all[picked])
        split = {"block": b, "groups": len(set(groups[picked].tolist())), "pooled": {}, "levelled": {}}
        for name, (x, c) in inputs.items():
            pooled, levelled = np.zeros(len(y)), np.zeros(len(y))
            for k in np.unique(folds):
                train, test = picked[folds != k], picked[folds == k]
                logit = fitted_logistic(x[train], y_all[train], c)
                pooled[folds == k] = logit(x[test])
                levelled[folds == k] = pooled[folds == k] - level(logit(x[unlabelled]))
            split["pooled"][name], split["levelled"][name] = round(auroc(y, pooled), 3), round(auroc(y, levelled), 3)
        log(f"block {b}: pooled {split['pooled']}; levelled {split['levelled']}")
        report["splits"].append(split)
    args.out.write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
