"""Issue 33, item 3's comparison: re-estimated batch-norm statistics (AdaBN) against, and beside,
a regularised head refit on frozen features. Research: nothing here is shipped; RESULTS.md says
what it measured.

    python plugins/lymphoblast/experiments/site_aria_adabn.py [--shared DIR] [--cache DIR]

`site_aria.py` stood in for AdaBN by re-standardising the 768 pooled features on the site's
cells. This does the real thing: the frozen ImageNet MobileNet's batch-norm means and variances
are estimated again, layer by layer, on the onboarding block's cells (unlabelled: no label is
used), one set per scale (224 and 128 px, as 2.1.0 applies the backbone), and every cell's
features are computed again through the adapted backbone: `adabn.adapted_backbones` and the
graph `export.single_view_function` builds, as `dxserve site onboard` does. Same cells (smear-field with the site
profile), same splits (5 contiguous number blocks per class; split b adapts and fits on block b,
scores the others), same draws and logistic heads as `site_aria.py`:

- "unadapted head": 2.1.0's own MLP head on the adapted features (AdaBN alone, no label);
- "head (features + size)": a logistic head refit on n labelled cells, on the ImageNet-statistics
  features (what `adapt` ships) and on the adapted ones (AdaBN and a head refit, both);
- the size, cell-colour and background baselines in the same splits.
"""

from __future__ import annotations

import json

import numpy as np

import site_aria as aria
from site_aria import log
from onboard_aria import data_colour

SCALES = (224, 128)
VIEWS = 2


def features(function, cells: np.ndarray, batch: int = 32) -> np.ndarray:
    """float32 (n, views, 768) of uint8 cells through `export.single_view_function` (the graph
    the site version serves, in TensorFlow), per view."""
    from dxserve_lymphoblast.litert import views_of

    out = []
    for start in range(0, len(cells), batch):
        part = cells[start:start + batch]
        _, f = function(views_of(part, VIEWS), np.full((VIEWS * len(part), 1), 5.0, np.float32))
        out.append(np.asarray(f).reshape(VIEWS, len(part), -1).transpose(1, 0, 2))
    return np.concatenate(out)


def main() -> None:
    args = aria.arguments(__doc__, "site_aria_adabn")

    from dxserve_lymphoblast.adabn import adapted_backbones
    from dxserve_lymphoblast.export import single_view_function
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version

    parent = aria.keras_model("2.1.0")
    stored = args.cache / "site_aria_adabn.npz"
    if (found := aria.cached(stored)) is not None:
        data, rows = found
    else:
        log("Aria: finding cells (site profile, as site_aria.py)")
        crops, rows = aria.aria_cells(args.shared / "data" / "aria-taleqani")
        runtime = LymphoblastRuntime(find_version("2.1.0"))
        runtime.load()
        records = np.stack([runtime.prepare(c)[0] for c in crops])
        found = [r for r in rows if r["cell"] >= 0]
        block = aria.blocks(found)
        data = {"log_diameter": records["log_diameter"].astype(np.float64), "background": np.array([r["background"] for r in found]),
                "mean_rgb": data_colour(records["cell"], range(len(records)))}
        log(f"{len(records)} cells: ImageNet statistics")
        data["imagenet"] = features(single_view_function(parent, SCALES), records["cell"])
        data["served"] = runtime._run_with_features(records)[1]
        for b in range(aria.BLOCKS):
            adapted = adapted_backbones(parent, records["cell"][block == b], list(SCALES), VIEWS)
            data[f"adabn/{b}"] = features(single_view_function(parent, SCALES, adapted), records["cell"])
            log(f"split {b}: adapted on {int((block == b).sum())} cells")
        data["rows"] = np.array(json.dumps(rows))
        np.savez(stored, **data)
        data.pop("rows")
    found = [r for r in rows if r["cell"] >= 0]
    y = np.array([r["label"] == "blast" for r in found], int)
    block = aria.blocks(found)
    check = float(np.abs(data["imagenet"].mean(axis=1) - data["served"]).max())
    log(f"ImageNet-statistics features against the served graph's: max difference {check:.2e}")
    report = {"cells": len(found), "features_vs_served_max_abs": check}

    head = unadapted_head(parent.get_layer("head"))
    report["unadapted AUROC (2.1.0's head)"] = {
        "imagenet statistics": aria.auroc(y, head(data["imagenet"], data["log_diameter"])),
        "adabn, per split (scored on the other blocks)": [
            aria.auroc(y[block != b], head(data[f"adabn/{b}"], data["log_diameter"])[block != b]) for b in range(aria.BLOCKS)]}
    log(json.dumps(report))
    size = data["log_diameter"][:, None]
    left_out = {b: aria.near(found, block, b, args.gap) for b in range(aria.BLOCKS)} if args.gap else None
    if left_out:
        report["gap"] = {"field_numbers": args.gap, "left_out_cells_per_split": [int(m.sum()) for m in left_out.values()]}
        log(json.dumps(report["gap"]))
    report["curve"] = aria.curve({
        "head on ImageNet statistics": np.column_stack([data["imagenet"].mean(axis=1), size]),
        "head on AdaBN features": {b: np.column_stack([data[f"adabn/{b}"].mean(axis=1), size]) for b in range(aria.BLOCKS)},
        "size alone": size, "cell colour alone": data["mean_rgb"], "background alone": data["background"]}, y, block, "", log,
        left_out=left_out)
    args.out.write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")


def unadapted_head(head):
    """2.1.0's own MLP heads (`head`, its Keras layer) on per-view features (n, views, d) and log
    diameters, logits averaged over views as served."""
    return lambda f, d: np.mean([np.asarray(head({"features": f[:, k].astype(np.float32), "log_diameter": d[:, None].astype(np.float32)})).ravel()
                                 for k in range(f.shape[1])], axis=0)


if __name__ == "__main__":
    main()
