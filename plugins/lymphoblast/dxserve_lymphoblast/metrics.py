"""Metrics and plots for a set of predictions, overall and per subject."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve

from .calibration import Thresholds, expected_calibration_error


def summarise(p: np.ndarray, labels: np.ndarray, subjects: np.ndarray, thresholds: Thresholds | None = None) -> dict:
    """Metrics of calibrated P(lymphoblast) `p` against `labels` (1 = lymphoblast).

    Decisions use the operating point when thresholds are given (0.5 otherwise); the
    `indeterminate` figures count the band and the `decided_*` ones exclude it.
    """
    threshold = thresholds.operating_point if thresholds else 0.5
    predicted = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    report = {
        "images": int(len(labels)),
        "lymphoblasts": int(labels.sum()),
        "normals": int((labels == 0).sum()),
        "threshold": float(threshold),
        "weighted_f1": float(f1_score(labels, predicted, average="weighted", zero_division=0)),
        "sensitivity": float(tp / max(tp + fn, 1)),
        "specificity": float(tn / max(tn + fp, 1)),
        "accuracy": float((tp + tn) / len(labels)),
        "auroc": float(roc_auc_score(labels, p)) if len(np.unique(labels)) == 2 else None,
        "ece": expected_calibration_error(p, labels),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }
    if thresholds:
        decision = thresholds.decide(p)
        decided = decision >= 0
        report["indeterminate_fraction"] = float(1 - decided.mean())
        report["decided_accuracy"] = float((decision[decided] == labels[decided]).mean()) if decided.any() else None
    report["per_subject"] = {
        s: {
            "images": int((subjects == s).sum()),
            "label": "lymphoblast" if labels[subjects == s][0] == 1 else "normal",
            "accuracy": float((predicted[subjects == s] == labels[subjects == s]).mean()),
            "mean_p_lymphoblast": float(p[subjects == s].mean()),
        }
        for s in sorted(set(subjects.tolist()))
    }
    return report


def plot(p: np.ndarray, labels: np.ndarray, out_dir: Path, title: str, threshold: float = 0.5) -> list[Path]:
    """ROC curve, reliability diagram and confusion matrix as PNGs in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, p)
        ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (lymphoblast)", title=f"ROC: {title}")
    ax.legend(loc="lower right")
    written.append(_save(fig, out_dir / "roc.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    confidence = np.maximum(p, 1 - p)
    correct = (p >= 0.5) == (labels == 1)
    edges = np.linspace(0.5, 1.0, 11)
    centres, accuracy, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence >= lo) & ((confidence < hi) | (hi == 1.0))
        if in_bin.any():
            centres.append(confidence[in_bin].mean())
            accuracy.append(correct[in_bin].mean())
            counts.append(in_bin.sum())
    ax.bar(centres, accuracy, width=0.045, alpha=0.7, label="accuracy per confidence bin")
    ax.plot([0.5, 1], [0.5, 1], "k:", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0.5, 1), ylim=(0, 1),
           title=f"Reliability, ECE {expected_calibration_error(p, labels):.3f}")
    ax.legend(loc="upper left")
    written.append(_save(fig, out_dir / "reliability.png"))

    fig, ax = plt.subplots(figsize=(4, 4))
    cm = confusion_matrix(labels, (p >= threshold).astype(int), labels=[1, 0])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["lymphoblast", "normal"], yticklabels=["lymphoblast", "normal"],
           xlabel="predicted", ylabel="true", title=f"Confusion at p >= {threshold:.2f}")
    written.append(_save(fig, out_dir / "confusion.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
