"""Metrics and plots for a set of predictions, overall and per subject."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve

from .calibration import Thresholds, ece_floor, expected_calibration_error


def summarise(p: np.ndarray, labels: np.ndarray, subjects: np.ndarray, thresholds: Thresholds | None = None) -> dict:
    """Metrics of calibrated P(lymphoblast) `p` against `labels` (1 = lymphoblast).

    Weighted F1, accuracy and the per-subject accuracy are those of the more probable label
    (P >= 0.5). Sensitivity and specificity are at the screening threshold when thresholds
    are given (0.5 otherwise); the `indeterminate` figures count the calling band and the
    `decided_*` ones exclude it.
    """
    threshold = thresholds.operating_point if thresholds else 0.5
    called = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    report = {
        "images": int(len(labels)),
        "lymphoblasts": int(labels.sum()),
        "normals": int((labels == 0).sum()),
        "threshold": float(threshold),
        "weighted_f1": float(f1_score(labels, called, average="weighted", zero_division=0)),
        "accuracy": float((called == labels).mean()),
        "sensitivity": float(tp / max(tp + fn, 1)),
        "specificity": float(tn / max(tn + fp, 1)),
        "auroc": float(roc_auc_score(labels, p)) if len(np.unique(labels)) == 2 else None,
        "ece": expected_calibration_error(p, labels),
        "ece_floor": ece_floor(p),  # what a perfectly calibrated model would show here (sampling noise)
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
            "accuracy": float((called[subjects == s] == labels[subjects == s]).mean()),
            "mean_p_lymphoblast": float(p[subjects == s].mean()),
        }
        for s in sorted(set(subjects.tolist()))
    }
    return report


def bootstrap_over_subjects(p: np.ndarray, labels: np.ndarray, groups: np.ndarray, resamples: int = 1000,
                            seed: int = 0) -> dict:
    """95 % percentile intervals of AUROC and weighted F1 (at P >= 0.5) over subjects.

    Each resample draws subject groups with replacement, normal and blast groups apart (a
    group holds one class), and takes all their images: the interval says how much the
    figures depend on which people happened to be in the data, which an image-level
    bootstrap would hide.
    """
    rng = np.random.default_rng(seed)
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    by_class = [[g for g, idx in members.items() if labels[idx[0]] == c] for c in (0, 1)]
    auroc, wf1 = [], []
    for _ in range(resamples):
        drawn = [g for names in by_class for g in rng.choice(names, len(names), replace=True)] if all(by_class) else []
        if not drawn:
            break
        index = np.concatenate([members[g] for g in drawn])
        auroc.append(roc_auc_score(labels[index], p[index]))
        wf1.append(f1_score(labels[index], p[index] >= 0.5, average="weighted", zero_division=0))

    def interval(values):
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    return {"resamples": len(auroc), "auroc_95ci": interval(auroc), "weighted_f1_95ci": interval(wf1)}


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
