"""The calibration maps of round3.py (none, temperature, Platt, beta, isotonic; images or
subjects weighted equally) on a shipped version's own out-of-fold logits, by per-fold ECE:

    python plugins/lymphoblast/experiments/calibration_maps.py [--version 2.1.0]

Reads only the version's `out_of_fold.csv` (no images, no features): each fold's cells are
calibrated by a map fitted on the other folds' logits. Last, a late fusion with cell size: a
logistic regression on the model's logit and the size-alone logit, fitted on the other folds'
cells, as the fold's logit. Research: RESULTS.md says what it measured.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from round3 import report  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from dxserve_lymphoblast.plugin import MODELS_DIR  # noqa: E402
from dxserve_lymphoblast.baselines import SIZE_ALONE as SIZE  # noqa: E402
from dxserve_lymphoblast.train import MODEL, MODEL_8_VIEWS  # noqa: E402


def fused_with_size(z: np.ndarray, size: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Each fold's logit from a logistic regression on (model logit, size logit) fitted on the other folds."""
    x, out = np.c_[z, size], np.zeros(len(z))
    for k in range(fold.max() + 1):
        fit = LogisticRegression(C=1e6).fit(x[fold != k], y[fold != k])
        out[fold == k] = fit.decision_function(x[fold == k])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="2.1.0")
    args = parser.parse_args()
    with (MODELS_DIR / args.version / "out_of_fold.csv").open() as f:
        rows = list(csv.DictReader(f))
    cells = SimpleNamespace(labels=np.array([r["label"] == "lymphoblast" for r in rows], int),
                            subjects=np.array([r["subject"] for r in rows]))
    fold = np.array([int(r["fold"]) - 1 for r in rows])
    logit = {name: np.array([float(r[f"logit: {name}"]) for r in rows]) for name in (MODEL, MODEL_8_VIEWS, SIZE)}
    for name in (MODEL, MODEL_8_VIEWS):
        report(f"{args.version}, logit: {name}", logit[name], cells, fold, None)
    report(f"{args.version}, logit: {MODEL} fused with {SIZE}", fused_with_size(logit[MODEL], logit[SIZE], cells.labels, fold),
           cells, fold, None)


if __name__ == "__main__":
    main()
