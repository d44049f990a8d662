"""Out-of-distribution score on the model's own CNN features.

The quality gate (`gate.py`) looks at pixels; this looks at what the model sees. The
Mahalanobis distance of an image's backbone features (`model.feature_extractor`, averaged
over the orientations the version serves) to the training cells' features, with a
Ledoit-Wolf shrunk covariance, is compared with the developer set's 99.5th percentile. A
larger distance is answered indeterminate with the code OUT_OF_DISTRIBUTION. The mean,
precision matrix and threshold ship per version in `ood.npz`, whose SHA-256 is in the card.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dxserve.runtime import QualityIssue, sha256_of

OOD_FILE = "ood.npz"
PERCENTILE = 99.5
CODE = "OUT_OF_DISTRIBUTION"


def fit(features: np.ndarray, percentile: float = PERCENTILE) -> dict[str, np.ndarray]:
    """Mean, shrunk precision and threshold from (n, d) training features."""
    from sklearn.covariance import LedoitWolf

    x = features.astype(np.float64)
    estimate = LedoitWolf().fit(x)
    ood = {"mean": estimate.location_.astype(np.float32), "precision": estimate.precision_.astype(np.float32)}
    ood["threshold"] = np.float32(np.percentile(distance(x, ood), percentile))
    return ood


def distance(features: np.ndarray, ood: dict[str, np.ndarray]) -> np.ndarray:
    """Mahalanobis distance of each row of (n, d) features to the training features."""
    delta = np.asarray(features, np.float64) - ood["mean"]
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", delta, ood["precision"].astype(np.float64), delta), 0.0))


def issues(features: np.ndarray, ood: dict[str, np.ndarray]) -> list[list[QualityIssue]]:
    """Per image: [the OUT_OF_DISTRIBUTION issue] when its distance passes the threshold, else []."""
    threshold = float(ood["threshold"])
    return [
        [QualityIssue(CODE, f"the model's CNN features lie at Mahalanobis distance {d:.1f} from the training "
                            f"cells', beyond their {PERCENTILE}th percentile {threshold:.1f}", float(d), 0.0, threshold)]
        if d > threshold else []
        for d in distance(features, ood)
    ]


def save(ood: dict[str, np.ndarray], folder: Path) -> dict:
    """Write `ood.npz` into a version's folder; returns the card's entry for it."""
    path = folder / OOD_FILE
    np.savez(path, **ood)
    return {"file": OOD_FILE, "sha256": sha256_of(path), "threshold": float(ood["threshold"]), "percentile": PERCENTILE,
            "method": "Mahalanobis distance of the CNN features (Ledoit-Wolf covariance) to the developer set's"}


def load(folder: Path, entry: dict) -> dict[str, np.ndarray]:
    """`ood.npz` of a version, refused when its hash is not the card's."""
    path = folder / entry["file"]
    if sha256_of(path) != entry["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from the model card's; refusing to load it")
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}
