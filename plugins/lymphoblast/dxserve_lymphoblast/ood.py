"""Out-of-distribution score on the model's own CNN features.

The quality gate (`gate.py`) looks at pixels; this looks at what the model sees. The
Mahalanobis distance of an image's backbone features (`model.feature_extractor`, averaged
over the orientations the version serves) to the training cells' features, with a
Ledoit-Wolf shrunk covariance, is compared with a threshold; a larger distance is answered
indeterminate with the code OUT_OF_DISTRIBUTION. The mean, precision matrix and threshold ship
per version in `ood.npz`, whose SHA-256 is in the card.

The threshold is the 99.5th percentile of *out-of-fold* distances: each developer cell scored
by a model fitted on the other folds' subjects (the cross-validation's subject-grouped folds),
so about 0.5 % of a new patient's ordinary cells are flagged. The in-sample percentile (45.2
for 2.0.0) flagged 4.4 % of cells from subjects the fit had not seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dxserve.runtime import QualityIssue, sha256_of

OOD_FILE = "ood.npz"
PERCENTILE = 99.5
CODE = "OUT_OF_DISTRIBUTION"


def fit(features: np.ndarray, percentile: float = PERCENTILE, folds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mean and shrunk precision from (n, d) training features; the threshold is the
    `percentile` of their distances, out of fold when `folds` (a fold number per row) is given."""
    x = features.astype(np.float64)
    ood = _gaussian(x)
    ood["threshold"] = np.float32(np.percentile(out_of_fold_distances(x, folds) if folds is not None else distance(x, ood), percentile))
    return ood


def _gaussian(x: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(x)
    return {"mean": estimate.location_.astype(np.float32), "precision": estimate.precision_.astype(np.float32)}


def out_of_fold_distances(features: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each row's distance under a model fitted on the rows of the other folds."""
    x = np.asarray(features, np.float64)
    out = np.empty(len(x))
    for k in np.unique(folds):
        held = folds == k
        out[held] = distance(x[held], _gaussian(x[~held]))
    return out


_blas = None


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. In the server the model's thread does
    this product between TensorFlow's batches, beside the threads preparing images: OpenBLAS's
    own threads waking there put 10-20 ms on the slowest calls (unary p99 40-49 ms against 27 ms
    with one thread), for a product that takes about a millisecond on one."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def distance(features: np.ndarray, ood: dict[str, np.ndarray]) -> np.ndarray:
    """Mahalanobis distance of each row of (n, d) features to the training features."""
    delta = np.asarray(features, np.float64) - ood["mean"]
    # (delta P) . delta row by row: a BLAS product, not einsum's triple loop over d x d per row.
    with one_blas_thread():
        product = delta @ np.asarray(ood["precision"], np.float64)
    return np.sqrt(np.maximum(np.einsum("nd,nd->n", product, delta), 0.0))


def issues(features: np.ndarray, ood: dict[str, np.ndarray]) -> list[list[QualityIssue]]:
    """Per image: [the OUT_OF_DISTRIBUTION issue] when its distance passes the threshold, else []."""
    threshold = float(ood["threshold"])
    return [
        [QualityIssue(CODE, f"the model's CNN features lie at Mahalanobis distance {d:.1f} from the training "
                            f"cells', beyond their {PERCENTILE}th percentile {threshold:.1f}", float(d), 0.0, threshold)]
        if d > threshold else []
        for d in distance(features, ood)
    ]


def save(ood: dict[str, np.ndarray], folder: Path, **measured) -> dict:
    """Write `ood.npz` into a version's folder; returns the card's entry for it (with `measured`)."""
    path = folder / OOD_FILE
    np.savez(path, **ood)
    return {"file": OOD_FILE, "sha256": sha256_of(path), "threshold": float(ood["threshold"]), "percentile": PERCENTILE,
            "method": "Mahalanobis distance of the CNN features (Ledoit-Wolf covariance) to the developer set's", **measured}


def fit_and_save(features: np.ndarray, folds: np.ndarray, folder: Path) -> dict:
    """Fit on every developer cell with the out-of-fold threshold, save; the card's entry
    reports how the in-sample threshold would have fared on unseen subjects."""
    model = fit(features, folds=folds)
    oof = out_of_fold_distances(features, folds)
    in_sample = float(np.percentile(distance(features, model), PERCENTILE))
    return save(model, folder, threshold_from="out-of-fold distances (the cross-validation's subject-grouped folds)",
                flagged_out_of_fold=round(float(np.mean(oof > model["threshold"])), 4),
                in_sample_threshold=round(in_sample, 2), in_sample_threshold_flagged_out_of_fold=round(float(np.mean(oof > in_sample)), 4))


def load(folder: Path, entry: dict) -> dict[str, np.ndarray]:
    """`ood.npz` of a version, refused when its hash is not the card's."""
    path = folder / entry["file"]
    if sha256_of(path) != entry["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from the model card's; refusing to load it")
    with np.load(path) as stored:  # as float64 once, not per batch (float32 -> float64 is exact)
        return {key: stored[key].astype(np.float64) if stored[key].dtype == np.float32 else stored[key] for key in stored.files}
