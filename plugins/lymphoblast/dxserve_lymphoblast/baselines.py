"""Reference recipes fitted in the same folds as the model, so every report says what the CNN adds.

- `size alone`: logistic regression on the log cell diameter. Blasts are larger than
  normal precursors; any model must beat this trivial rule to earn its CNN.
- `frozen MobileNet + size, logistic`: the frozen ImageNet backbone's last-block features
  at the full input size (224 px), averaged over the 8 orientations of the cell, with the log diameter, standardised, and
  a logistic regression on top (the reference recipe of issue 6).
"""

from __future__ import annotations

import numpy as np

SIZE_ALONE = "size alone (logistic on log diameter)"
FROZEN_LOGISTIC = "frozen MobileNet 8-view mean + size, logistic"


def fitted_logistic(x_train: np.ndarray, y_train: np.ndarray, c: float = 1.0):
    """The logit function (x -> logits) of a standardised logistic regression (L2, inverse strength
    `c`) fitted on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x_train, y_train).decision_function


def _logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    return fitted_logistic(x_train, y_train)(x_test)


def size_alone(log_d_train: np.ndarray, y_train: np.ndarray, log_d_test: np.ndarray) -> np.ndarray:
    """Logits of a logistic regression on the log cell diameter."""
    return _logistic(log_d_train[:, None], y_train, log_d_test[:, None])


def frozen_logistic(features_train: np.ndarray, log_d_train: np.ndarray, y_train: np.ndarray,
                    features_test: np.ndarray, log_d_test: np.ndarray) -> np.ndarray:
    """Logits of the reference recipe; features (n, views, d) as `features.extract` makes them."""
    from .model import LAST_BLOCK_FEATURES

    def design(f, log_d):
        return np.c_[f[:, :, LAST_BLOCK_FEATURES].astype(np.float32).mean(axis=1), log_d]

    return _logistic(design(features_train, log_d_train), y_train, design(features_test, log_d_test))


def size_alone_fit(log_diameters: np.ndarray, labels: np.ndarray) -> dict:
    """The size-alone rule fitted on every training cell, in raw units: P(lymphoblast) =
    sigmoid(coef * log_diameter + intercept). Stored in the model card so `evaluate`
    scores it beside the model on any labelled set."""
    from sklearn.linear_model import LogisticRegression

    mean, std = float(log_diameters.mean()), float(log_diameters.std())
    model = LogisticRegression(max_iter=5000).fit(((log_diameters - mean) / std)[:, None], labels)
    coef = float(model.coef_[0, 0]) / std
    return {"coef": coef, "intercept": float(model.intercept_[0]) - coef * mean, "name": SIZE_ALONE}


def size_alone_probability(fit: dict, log_diameters: np.ndarray) -> np.ndarray:
    from .calibration import expit

    return expit(fit["coef"] * np.asarray(log_diameters, np.float64) + fit["intercept"])
