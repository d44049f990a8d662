"""Temperature scaling, calibration error, and the operating point with its indeterminate band."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def expit(x) -> np.ndarray:
    """The logistic sigmoid 1 / (1 + e^-x), element by element with the C library's exp: equal to
    scipy.special.expit wherever the result is above 1e-300, so serving needs no SciPy (issue 30:
    143 MB of the serving install)."""
    flat = np.asarray(x, np.float64)
    out = np.array([1.0 / (1.0 + math.exp(-t)) if t > -709.0 else math.exp(t) for t in flat.ravel().tolist()])
    return out.reshape(flat.shape) if flat.shape else out.reshape(())


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """P(lymphoblast) = sigmoid(logit / T), without overflow for large logits."""
    return expit(np.asarray(logits, np.float64) / temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the log loss of sigmoid(logits / T)."""

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        # log(1 + e^z) - y z, computed stably
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    from scipy.optimize import minimize_scalar  # training only ([train] brings SciPy)

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def mix_weights(labels: np.ndarray, share: float | None = None) -> np.ndarray:
    """A weight per image (mean 1) under which lymphoblasts (label 1) make up `share` of the images,
    whatever their share among these: figures read at a declared mix (a site's `prevalence`)
    from images labelled at another (half of each class). None, or one class only: all 1."""
    labels = np.asarray(labels)
    here = float(np.mean(labels == 1)) if len(labels) else 0.0
    if share is None or not 0 < here < 1:
        return np.ones(len(labels))
    return np.where(labels == 1, share / here, (1 - share) / (1 - here))


def expected_calibration_error(p_positive: np.ndarray, labels: np.ndarray, bins: int = 15,
                               weight: np.ndarray | None = None) -> float:
    """Top-label ECE: the bin-weighted gap between confidence and accuracy of the decided class
    (each image counted `weight` times: `mix_weights` reads it at another mix of the classes)."""
    confidence = np.maximum(p_positive, 1 - p_positive)
    correct = (p_positive >= 0.5) == (labels == 1)
    weight = np.ones(len(confidence)) if weight is None else np.asarray(weight, np.float64)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            w = weight[in_bin]
            ece += w.sum() / weight.sum() * abs(np.average(confidence[in_bin], weights=w) - np.average(correct[in_bin], weights=w))
    return float(ece)


def ece_floor(p_positive: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would still show on these cells: the mean
    `expected_calibration_error` of `p_positive` against labels drawn from `p_positive` itself.
    Binned ECE is biased upwards by sampling noise, the more so the fewer the cells and the
    less confident the model; an ECE is judged by how far it lies above this floor."""
    rng = np.random.default_rng(seed)
    p = np.asarray(p_positive, np.float64)
    return float(np.mean([expected_calibration_error(p, (rng.random(p.shape) < p).astype(int), bins) for _ in range(draws)]))


@dataclass
class Thresholds:
    """Versioned decision rule on the calibrated P(lymphoblast), shipped with the weights.

    Two separate questions, answered separately so no output reads as a contradiction:

    - the call: lymphoblast when p >= upper, normal when p < lower, indeterminate between.
      The band always contains 0.5 (`decide` enforces it for older cards too), so a
      called label is always the more probable one, the response's top_label.
    - the screen: screen-positive when p >= `operating_point`, the threshold chosen for
      high sensitivity on held-out subjects. A flag for review, not a call.
    """

    operating_point: float
    lower: float
    upper: float
    target_sensitivity: float
    target_decided_accuracy: float

    def decide(self, p_lymphoblast: np.ndarray) -> np.ndarray:
        """1 = lymphoblast, 0 = normal, -1 = indeterminate."""
        p = np.asarray(p_lymphoblast)
        return np.where(p >= max(self.upper, 0.5), 1, np.where(p < min(self.lower, 0.5), 0, -1))

    def screen(self, p_lymphoblast: np.ndarray) -> np.ndarray:
        """True where P(lymphoblast) reaches the high-sensitivity operating point."""
        return np.asarray(p_lymphoblast) >= self.operating_point

    def describe(self) -> str:
        return (f"call lymphoblast at P(lymphoblast) >= {max(self.upper, 0.5):.3f}, normal at P < {min(self.lower, 0.5):.3f}, "
                f"else indeterminate; screen-positive at P >= {self.operating_point:.3f} "
                f"(sensitivity {self.target_sensitivity:.2f} on held-out subjects)")

    def to_dict(self) -> dict:
        return asdict(self)


def choose_thresholds(
    p: np.ndarray,
    labels: np.ndarray,
    target_sensitivity: float = 0.95,
    target_decided_accuracy: float = 0.95,
    max_indeterminate: float = 0.15,
    weight: np.ndarray | None = None,
) -> Thresholds:
    """Pick the screening threshold and the calling band on held-out predictions.

    The screening threshold is the highest whose sensitivity for lymphoblasts is at least
    `target_sensitivity` (missing a blast costs more than a second look at a normal cell).
    The band is the narrowest interval around P = 0.5, symmetric in logit space, that lifts
    the accuracy of the called results to `target_decided_accuracy`, but never leaves more
    than `max_indeterminate` of the images undecided. Each image counts `weight` times in both
    (`mix_weights`: at a site's declared mix); the screening threshold reads blasts only.
    """
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    weight = np.ones(len(p)) if weight is None else np.asarray(weight, np.float64)
    positives = np.sort(p[labels == 1])
    # Threshold at the (1 - target) quantile of the blasts' probabilities.
    k = int(np.floor((1 - target_sensitivity) * len(positives)))
    operating = float(positives[k]) if len(positives) else 0.5
    lower = upper = 0.5
    for width in np.linspace(0.0, 6.0, 241):
        lo, hi = float(expit(-width)), float(expit(width))
        undecided = (p >= lo) & (p < hi)
        if np.average(undecided, weights=weight) > max_indeterminate:
            break
        lower, upper = lo, hi
        decided = ~undecided
        accuracy = (np.average((p[decided] >= hi) == (labels[decided] == 1), weights=weight[decided])
                    if decided.any() else 1.0)
        if accuracy >= target_decided_accuracy:
            break
    return Thresholds(operating, lower, upper, target_sensitivity, target_decided_accuracy)
