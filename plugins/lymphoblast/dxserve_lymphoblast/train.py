"""Training: one model, subject-grouped cross-validation, and the shipped weights with their card."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .calibration import calibrated, choose_thresholds, expected_calibration_error, fit_temperature
from .data import Cells, dataset, grouped_folds, reference_colour
from .metrics import summarise


@dataclass
class TrainConfig:
    """The training recipe. Every figure in the model card comes from one of these."""

    image_size: int = 96
    stem: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 192)
    mlp_units: int = 128
    dropout: float = 0.4
    grey: bool = False
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8
    folds: int = 5
    seed: int = 0
    target_sensitivity: float = 0.95
    target_decided_accuracy: float = 0.95
    max_indeterminate: float = 0.2


def train_model(train: Cells, val: Cells | None, config: TrainConfig, epochs: int | None = None,
                verbose: int | None = None):
    """Fit one model. With `val`, early stopping on those held-out subjects' AUROC restores the
    best epoch; without, exactly `epochs` epochs run (the learning rate decays over them)."""
    import keras

    from .model import build_model

    keras.utils.set_random_seed(config.seed)
    model = build_model(config.image_size, config.stem, config.widths, config.mlp_units, config.dropout,
                        reference_colour(train.images), (float(train.log_diameters.mean()), float(train.log_diameters.std())),
                        config.grey)
    epochs = epochs or config.epochs
    steps = epochs * int(np.ceil(len(train) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps, warmup_target=None)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        weighted_metrics=[],
        metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
    )
    if verbose is None:  # a progress bar on a terminal, a line an epoch in a log file
        verbose = 1 if sys.stdout.isatty() else 2
    stop = keras.callbacks.EarlyStopping("val_auc", mode="max", patience=config.patience, restore_best_weights=True)
    history = model.fit(
        dataset(train, config.batch_size, training=True, seed=config.seed),
        validation_data=None if val is None else dataset(val, 128, training=False),
        epochs=epochs,
        callbacks=[] if val is None else [stop],
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=verbose,
    )
    return without_optimizer(model), {k: [float(v) for v in vals] for k, vals in history.history.items()}


def without_optimizer(model):
    """An uncompiled copy: the shipped file holds weights, not 2x their size in optimizer state."""
    import keras

    # Not keras.models.clone_model: since Keras 3.1x it copies the compiled optimizer too.
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def predict_logits(model, cells: Cells) -> np.ndarray:
    return model.predict(dataset(cells, 128, training=False), verbose=0)[:, 0]


def inner_split(cells: Cells, config: TrainConfig) -> tuple[Cells, Cells]:
    """Split training subjects once more: a subject-held-out validation set for early
    stopping and temperature fitting, never used for the reported test metrics."""
    # About a fifth of the groups, whatever the outer fold count.
    n_splits = max(2, min(5, len(set(cells.groups.tolist()))))
    train_idx, val_idx = grouped_folds(cells, n_splits, config.seed + 1)[0]
    return cells.subset(train_idx), cells.subset(val_idx)


@dataclass
class OutOfFold:
    """Every image's logit from the fold model that never saw its subject."""

    logits: np.ndarray
    fold: np.ndarray  # 0-based fold of each image
    cells: Cells  # in the same order
    probabilities: np.ndarray | None = None  # calibrated with the cross-fitted temperatures


def cross_validate(cells: Cells, config: TrainConfig, log=print) -> tuple[dict, OutOfFold]:
    """Grouped K-fold over subject groups: per fold train (early stopping on an inner
    subject-held-out split) and predict the fold's unseen subjects.

    Calibration is cross-fitted: fold k's probabilities use a temperature fitted on the
    other folds' out-of-fold logits, so each fold's ECE is measured on subjects that fitted
    neither its model nor its temperature. A single validation split is dominated by one or
    two subjects, and a temperature fitted there did not transfer (1.0.0's card).
    """
    order, fold_of, logits = [], [], []
    histories = []
    for k, (train_idx, test_idx) in enumerate(grouped_folds(cells, config.folds, config.seed)):
        started = time.time()
        train, test = cells.subset(train_idx), cells.subset(test_idx)
        fit, val = inner_split(train, config)
        log(f"fold {k + 1}/{config.folds}: train {len(fit)} / val {len(val)} / test {len(test)} images, "
            f"test subjects {sorted(set(test.subjects.tolist()))}")
        model, history = train_model(fit, val, config)
        order.append(test_idx), fold_of.append(np.full(len(test_idx), k)), logits.append(predict_logits(model, test))
        best_epoch = int(np.argmax(history["val_auc"])) + 1
        histories.append((len(history["loss"]), best_epoch, time.time() - started))
        log(f"fold {k + 1}: {histories[-1][0]} epochs, best {best_epoch}, {histories[-1][2]:.0f} s")
    index = np.concatenate(order)
    oof = OutOfFold(np.concatenate(logits), np.concatenate(fold_of), cells.subset(index))
    y, s = oof.cells.labels, oof.cells.subjects

    folds, p = [], np.zeros(len(y))
    for k in range(config.folds):
        here = oof.fold == k
        temperature = fit_temperature(oof.logits[~here], y[~here])
        p[here] = calibrated(oof.logits[here], temperature)
        result = summarise(p[here], y[here], s[here])
        result.update(fold=k + 1, temperature=temperature, epochs_run=histories[k][0], best_epoch=histories[k][1],
                      seconds=histories[k][2],
                      ece_uncalibrated=expected_calibration_error(calibrated(oof.logits[here], 1.0), y[here]))
        log(f"fold {k + 1}: weighted F1 {result['weighted_f1']:.3f}, AUROC {result['auroc']}, "
            f"ECE {result['ece_uncalibrated']:.3f} -> {result['ece']:.3f}")
        folds.append(result)
    oof.probabilities = p
    thresholds = choose_thresholds(p, y, config.target_sensitivity, config.target_decided_accuracy, config.max_indeterminate)
    spread = {
        m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
        for m in ("weighted_f1", "auroc", "ece", "ece_uncalibrated", "sensitivity", "specificity")
        if (v := [f[m] for f in folds if f[m] is not None])
    }
    pooled = summarise(p, y, s, thresholds)
    pooled["ece_uncalibrated"] = expected_calibration_error(calibrated(oof.logits, 1.0), y)
    report = {"folds": folds, "across_folds": spread, "pooled_out_of_fold": pooled, "thresholds": thresholds.to_dict(),
              "temperature": fit_temperature(oof.logits, y),
              "final_epochs": int(np.median([h[1] for h in histories]))}
    return report, oof


def train_final(cells: Cells, config: TrainConfig, epochs: int, log=print):
    """The shipped model: every subject, for the median best epoch of the cross-validation
    folds. No subject is held out here; an early-stopping split of its own would hold out
    a fifth of the few normal subjects and pick its epoch on one or two of them."""
    log(f"final model: all {len(cells)} images of {len(set(cells.subjects.tolist()))} subjects, {epochs} epochs")
    model, history = train_model(cells, None, config, epochs=epochs)
    return model, {"history": history, "epochs": epochs, "train_subjects": sorted(set(cells.subjects.tolist()))}


def config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
