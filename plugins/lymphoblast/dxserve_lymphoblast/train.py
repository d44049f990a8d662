"""Training: a pretrained CNN feature extractor, an MLP head on its cached features, subject-
grouped cross-validation with the reference recipes in the same folds, and the shipped model.

The work is staged so that two CPU cores suffice: the frozen ImageNet backbone's features
of every cell in its 8 orientations are computed once (`features.cached_features`, a few
minutes), and the MLP head then trains in seconds per fold.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import baselines
from .calibration import calibrated, choose_thresholds, expected_calibration_error, fit_temperature
from .data import Cells, grouped_folds, sample_weights
from .features import VIEWS
from .metrics import bootstrap_over_subjects, summarise


@dataclass
class TrainConfig:
    """The training recipe. Every figure in the model card comes from one of these."""

    image_size: int = 224  # the served input: the cell cropped, padded square and resized to this
    window: int = 0  # the crop: a fixed square of this many canvas pixels centred on the cell (0: the cell's own box)
    scales: tuple[int, ...] = (224, 128)  # the backbone sees the cell at each; their features are joined
    mlp_units: int = 64
    dropout: float = 0.3
    heads: int = 1  # MLP heads with seeds seed, seed + 1, ... whose logits are averaged (one backbone pass)
    use_size: bool = True  # the log cell diameter as an explicit MLP input
    epochs: int = 20  # over every training cell in all 8 orientations (and its augmented copies)
    augmented_copies: int = 0  # copies of each training cell as other microscopes might show it (features.augmented)
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    subject_power: float = 0.5  # data.sample_weights
    balance_classes: bool = False  # data.sample_weights: False keeps the class prior, so P >= 0.5 is a fair call
    test_views: int = 1  # orientations the default version averages per result (1, 2, 4 or 8)
    fine_tune_epochs: int = 0  # then train the backbone's top blocks too (batch norm frozen), on augmented images
    fine_tune_learning_rate: float = 3e-5
    fine_tune_from: str = "conv_dw_12"  # the first backbone layer trained ("": all of it); MobileNet's blocks 12-13
    fine_tune_patience: int = 1  # epochs without a better inner-fold AUROC before stopping
    fine_tune_batch_size: int = 32
    folds: int = 5
    seed: int = 0
    target_sensitivity: float = 0.95
    target_decided_accuracy: float = 0.95
    max_indeterminate: float = 0.15


def with_augmented(features: np.ndarray, augmented: np.ndarray | None) -> np.ndarray:
    """The head's training samples: the cells' own views and those of their augmented copies."""
    return features if augmented is None else np.concatenate([features, augmented], axis=1)


def train_head(features: np.ndarray, cells: Cells, config: TrainConfig, verbose: int = 0):
    """Fit the MLP head on (n, views, d) frozen features: every view is a sample. With
    `config.heads` > 1, that many heads from consecutive seeds, joined into one model that
    averages their logits (`model.averaged_heads`); the loss is their mean per epoch."""
    if config.heads > 1:
        from .model import averaged_heads

        fitted = [train_head(features, cells, replace(config, heads=1, seed=config.seed + i), verbose) for i in range(config.heads)]
        return averaged_heads([head for head, _ in fitted]), [float(v) for v in np.mean([loss for _, loss in fitted], axis=0)]
    import keras

    from .model import build_head

    keras.utils.set_random_seed(config.seed)
    n, views, dim = features.shape
    x = features.reshape(n * views, dim).astype(np.float32)
    log_d = np.repeat(cells.log_diameters.astype(np.float32), views)[:, None]
    y = np.repeat(cells.labels, views).astype(np.float32)
    w = np.repeat(sample_weights(cells.labels, cells.groups, config.subject_power, config.balance_classes), views)
    size_stats = (float(cells.log_diameters.mean()), float(cells.log_diameters.std())) if config.use_size else None
    head = build_head(dim, config.mlp_units, config.dropout, size_stats, (x.mean(axis=0), x.std(axis=0) + 1e-3))
    steps = config.epochs * int(np.ceil(len(y) / config.batch_size))
    head.compile(
        optimizer=keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(config.learning_rate, steps),
                                         weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    history = head.fit({"features": x, "log_diameter": log_d}, y, sample_weight=w, batch_size=config.batch_size,
                       epochs=config.epochs, shuffle=True, verbose=verbose)
    return head, [float(v) for v in history.history["loss"]]


def head_logits(head, features: np.ndarray, log_diameters: np.ndarray, views: int) -> np.ndarray:
    """Logits of the head on the first `views` orientations, averaged (test-time averaging)."""
    n, _, dim = features.shape
    x = features[:, :views].reshape(n * views, dim).astype(np.float32)
    log_d = np.repeat(log_diameters.astype(np.float32), views)[:, None]
    z = head.predict({"features": x, "log_diameter": log_d}, batch_size=4096, verbose=0)[:, 0]
    return z.reshape(n, views).mean(axis=1)


def fine_tune(head, cells: Cells, config: TrainConfig, weights, log=print, inner: Cells | None = None):
    """Stage two: the classifier (ImageNet backbone + the fitted head) trained end to end on
    augmented images (any orientation, stain, blur, zoom) from `config.fine_tune_from` on,
    with a low, cosine-decaying learning rate; batch-norm statistics stay ImageNet's.

    With `inner` (cells of subjects that neither `head` nor `cells` hold), the classifier's
    AUROC there is measured before and after each epoch, the best epoch's weights are kept,
    epoch 0 (the frozen head) included, and it stops after `fine_tune_patience` epochs without
    a gain; without, it runs every epoch. Returns (model, record) with the epoch kept and the
    inner-fold AUROC after each epoch.
    """
    import keras
    from sklearn.metrics import roc_auc_score

    from .data import dataset
    from .model import build_classifier

    keras.utils.set_random_seed(config.seed)
    model = build_classifier(config.image_size, head, weights, config.scales)
    backbone = model.get_layer("backbone")
    names = [layer.name for layer in backbone.layers]
    first = names.index(config.fine_tune_from) if config.fine_tune_from else 0
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)
    steps = config.fine_tune_epochs * int(np.ceil(len(cells) / config.fine_tune_batch_size))
    model.compile(
        optimizer=keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(config.fine_tune_learning_rate, steps),
                                         weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    data = dataset(cells, config.fine_tune_batch_size, training=True, seed=config.seed,
                   subject_power=config.subject_power, balance_classes=config.balance_classes)
    inner_auroc = lambda: float(roc_auc_score(inner.labels, classifier_logits(model, inner, 1)))  # noqa: E731
    record = {"inner_auroc": [inner_auroc()] if inner is not None else [], "loss": [], "epoch_seconds": []}
    best_epoch, best_weights = 0, model.get_weights()
    for epoch in range(1, config.fine_tune_epochs + 1):
        started = time.time()
        history = model.fit(data, epochs=epoch, initial_epoch=epoch - 1, verbose=0)
        record["loss"].append(float(history.history["loss"][-1]))
        record["epoch_seconds"].append(round(time.time() - started, 1))
        if inner is None:
            best_epoch, best_weights = epoch, None
            continue
        record["inner_auroc"].append(inner_auroc())
        log(f"fine-tuning epoch {epoch}: {record['epoch_seconds'][-1]:.0f} s on {len(cells)} images, "
            f"inner-fold AUROC {record['inner_auroc'][-1]:.3f} (epoch 0: {record['inner_auroc'][0]:.3f})")
        if record["inner_auroc"][-1] > record["inner_auroc"][best_epoch]:
            best_epoch, best_weights = epoch, model.get_weights()
        elif epoch - best_epoch >= config.fine_tune_patience:
            break
    if best_weights is not None:
        model.set_weights(best_weights)
    record["epoch_kept"] = best_epoch
    log(f"fine-tuning kept epoch {best_epoch} of {len(record['loss'])} run")
    return without_optimizer(model), record


def fine_tuned_fold(head, features: np.ndarray, cells: Cells, config: TrainConfig, weights, log=print):
    """One fold's classifier when fine-tuning, from `head` (fitted on all of `cells`, whose
    head `features` come with them) and a choice of how many epochs pay.

    The choice is made on an inner subject-grouped fifth of `cells` that neither a probe head
    nor its fine-tuning saw: measured from `head` itself, epoch 0 would be scored on subjects the
    head had learnt (inner AUROC 0.95-0.98 against 0.90-0.95 after an epoch, in every fold of
    one run) and would always win. Then `head` is fine-tuned that many epochs on all of `cells`,
    as `train_final` does with the folds' median; none kept: the frozen head. Returns (model,
    the probe's record, as `fine_tune` returns it)."""
    import keras

    from .model import build_classifier

    fit_idx, inner_idx = grouped_folds(cells, 5, config.seed)[0]
    fit_on = cells.subset(fit_idx)
    probe, _ = train_head(features[fit_idx], fit_on, config)
    _, record = fine_tune(probe, fit_on, config, weights, log, inner=cells.subset(inner_idx))
    if not record["epoch_kept"]:
        keras.utils.set_random_seed(config.seed)  # as fine_tune does: the same backbone when weights are random
        return build_classifier(config.image_size, head, weights, config.scales), record
    model, _ = fine_tune(head, cells, replace(config, fine_tune_epochs=record["epoch_kept"]), weights, log)
    return model, record


def without_optimizer(model):
    """An uncompiled copy: the shipped file holds weights, not 2x their size in optimizer state."""
    import keras

    # Not keras.models.clone_model: since Keras 3.1x it copies the compiled optimizer too.
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def classifier_logits(model, cells: Cells, views: int) -> np.ndarray:
    """Logits of the whole classifier on cell images, averaged over `views` orientations."""
    import tensorflow as tf

    from .data import dataset
    from .plugin import averaged_over_views

    forward = tf.function(averaged_over_views(model, views) if views > 1 else (lambda x: model(x, training=False)))
    return np.concatenate([forward(x).numpy()[:, 0] for x, _, _ in dataset(cells, 64, training=False)])


@dataclass
class OutOfFold:
    """Every image's logit from the fold model that never saw its subject, per candidate."""

    logits: dict[str, np.ndarray]  # candidate name -> logits in `cells` order
    fold: np.ndarray  # 0-based fold of each image
    cells: Cells
    probabilities: dict[str, np.ndarray]  # the same, calibrated with cross-fitted temperatures


MODEL = "model"
MODEL_8_VIEWS = "model, 8-view averaging"
FROZEN_HEAD = "frozen backbone + MLP head (before fine-tuning)"


def cross_validate(cells: Cells, features: np.ndarray, config: TrainConfig, weights=None, log=print,
                   augmented: np.ndarray | None = None) -> tuple[dict, OutOfFold]:
    """Stratified grouped K-fold over subject groups. In each fold the head (and, with
    `fine_tune_epochs`, the whole classifier from `weights`), and the reference recipes beside
    it, are fitted on the training subjects and predict the unseen test subjects. The head
    also learns from the `augmented` copies' features of its training cells; every test
    figure is on the cells as they are.

    Calibration is cross-fitted: fold k's probabilities use a temperature fitted on the other
    folds' out-of-fold logits, so each fold's ECE is measured on subjects that fitted neither
    its model nor its temperature.
    """
    folds = grouped_folds(cells, config.folds, config.seed)
    fold_of = np.zeros(len(cells), int)
    names = (MODEL, MODEL_8_VIEWS) + ((FROZEN_HEAD,) if config.fine_tune_epochs else ()) + (baselines.SIZE_ALONE, baselines.FROZEN_LOGISTIC)
    logits = {name: np.zeros(len(cells)) for name in names}
    seconds, tuned = [], []
    for k, (train_idx, test_idx) in enumerate(folds):
        started = time.time()
        train, test = cells.subset(train_idx), cells.subset(test_idx)
        fold_of[test_idx] = k
        head_features = with_augmented(features, augmented)[train_idx]
        head, _ = train_head(head_features, train, config)
        frozen = head_logits(head, features[test_idx], test.log_diameters, config.test_views)
        model = None  # the fold's fine-tuned classifier, when an epoch of fine-tuning paid
        if config.fine_tune_epochs:
            logits[FROZEN_HEAD][test_idx] = frozen
            classifier, record = fine_tuned_fold(head, head_features, train, config, weights, log)
            tuned.append(record)
            if record["epoch_kept"]:
                model = classifier
        if model is not None:
            logits[MODEL][test_idx] = classifier_logits(model, test, config.test_views)
            logits[MODEL_8_VIEWS][test_idx] = classifier_logits(model, test, VIEWS)
        else:  # the frozen head is the fold's model: scored from the cached features, not the images again
            logits[MODEL][test_idx] = frozen
            logits[MODEL_8_VIEWS][test_idx] = head_logits(head, features[test_idx], test.log_diameters, VIEWS)
        logits[baselines.SIZE_ALONE][test_idx] = baselines.size_alone(train.log_diameters, train.labels, test.log_diameters)
        logits[baselines.FROZEN_LOGISTIC][test_idx] = baselines.frozen_logistic(
            features[train_idx], train.log_diameters, train.labels, features[test_idx], test.log_diameters)
        seconds.append(time.time() - started)
        log(f"fold {k + 1}/{config.folds}: {len(train)} train / {len(test)} test images, "
            f"{len(set(test.groups.tolist()))} test subject groups, {seconds[-1]:.0f} s")

    y, subjects = cells.labels, cells.subjects
    candidates, probabilities = {}, {}
    for name, z in logits.items():
        p, per_fold = np.zeros(len(y)), []
        for k in range(config.folds):
            here = fold_of == k
            temperature = fit_temperature(z[~here], y[~here])
            p[here] = calibrated(z[here], temperature)
            result = summarise(p[here], y[here], subjects[here])
            result.update(fold=k + 1, temperature=temperature,
                          ece_uncalibrated=expected_calibration_error(calibrated(z[here], 1.0), y[here]))
            per_fold.append(result)
        probabilities[name] = p
        pooled = summarise(p, y, subjects)
        pooled.pop("per_subject")
        candidates[name] = {"pooled_out_of_fold": pooled, "folds": [{m: f[m] for m in FOLD_METRICS} for f in per_fold],
                            "bootstrap_over_subjects": bootstrap_over_subjects(p, y, cells.groups, seed=config.seed)}
        log(f"{name}: pooled AUROC {pooled['auroc']:.3f}, weighted F1 {pooled['weighted_f1']:.3f}, "
            "per fold AUROC " + " ".join(f"{f['auroc']:.3f}" for f in per_fold))
        if name == MODEL:
            model_folds = per_fold

    oof = OutOfFold(logits, fold_of, cells, probabilities)
    for f, s in zip(model_folds, seconds, strict=True):
        f["seconds"] = s
    report = {
        "folds": model_folds,
        "across_folds": {
            m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for m in ("weighted_f1", "auroc", "ece", "ece_floor", "ece_uncalibrated", "sensitivity", "specificity")
            if (v := [f[m] for f in model_folds if f[m] is not None])
        },
        **decision_rule(probabilities[MODEL], logits[MODEL], cells, config),
        "candidates": candidates,
        "versus_baselines": versus(candidates, MODEL),
        "test_time_averaging": decision_rule(probabilities[MODEL_8_VIEWS], logits[MODEL_8_VIEWS], cells, config),
    }
    if tuned:
        report["fine_tuning"] = {"folds": tuned, "final_epochs": int(np.median([r["epoch_kept"] for r in tuned]))}
    return report, oof


def decision_rule(p: np.ndarray, z: np.ndarray, cells: Cells, config: TrainConfig) -> dict:
    """Thresholds chosen on pooled out-of-fold probabilities, the metrics there, and the
    temperature the shipped model gets (fitted on all out-of-fold logits)."""
    y = cells.labels
    thresholds = choose_thresholds(p, y, config.target_sensitivity, config.target_decided_accuracy, config.max_indeterminate)
    pooled = summarise(p, y, cells.subjects, thresholds)
    pooled["ece_uncalibrated"] = expected_calibration_error(calibrated(z, 1.0), y)
    return {"pooled_out_of_fold": pooled, "thresholds": thresholds.to_dict(), "temperature": fit_temperature(z, y)}


FOLD_METRICS = ("fold", "images", "auroc", "weighted_f1", "sensitivity", "specificity", "ece", "ece_floor", "ece_uncalibrated",
                "temperature")


def versus_version(oof: OutOfFold, name: str, out_of_fold_csv: Path) -> dict | None:
    """This run's model against a shipped version `name` in the same folds, from that version's
    `out_of_fold.csv` (its cross-fitted probabilities): per fold AUROC, weighted F1 at P >= 0.5
    and ECE of both, the differences and the folds where this run is better (lower ECE). None
    when the file is missing or its cells or folds are not this run's (another data set or split)."""
    import csv

    if not out_of_fold_csv.exists():
        return None
    with out_of_fold_csv.open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    paths = oof.cells.paths.tolist()
    if set(rows) != set(paths) or any(int(rows[p]["fold"]) - 1 != k for p, k in zip(paths, oof.fold)):
        return None
    theirs = np.array([float(rows[p]["p_lymphoblast"]) for p in paths])
    y, folds = oof.cells.labels, []
    for k in range(int(oof.fold.max()) + 1):
        here = oof.fold == k
        pair = [summarise(p[here], y[here], oof.cells.subjects[here]) for p in (oof.probabilities[MODEL], theirs)]
        folds.append({m: [pair[0][m], pair[1][m]] for m in ("auroc", "weighted_f1", "ece")})
    better = {m: int(sum((f[m][0] < f[m][1]) if m == "ece" else (f[m][0] > f[m][1]) for f in folds)) for m in ("auroc", "weighted_f1", "ece")}
    return {"version": name, "folds": folds, "folds_better": better,
            "mean_ece": [float(np.mean([f["ece"][i] for f in folds])) for i in (0, 1)]}


def versus(candidates: dict, model: str) -> dict:
    """Per-fold and pooled differences model - each reference recipe (AUROC, weighted F1)."""
    out = {}
    for name, other in candidates.items():
        if name == model:
            continue
        entry = {}
        for metric in ("auroc", "weighted_f1"):
            deltas = [a[metric] - b[metric] for a, b in zip(candidates[model]["folds"], other["folds"], strict=True)
                      if a[metric] is not None and b[metric] is not None]
            entry[metric] = {
                "pooled": candidates[model]["pooled_out_of_fold"][metric] - other["pooled_out_of_fold"][metric],
                "per_fold": deltas,
                "folds_better": int(sum(d > 0 for d in deltas)),
            }
        out[name] = entry
    return out


def train_final(cells: Cells, features: np.ndarray, config: TrainConfig, weights=None, log=print,
                augmented: np.ndarray | None = None, fine_tune_epochs: int | None = None):
    """The shipped classifier: every subject, the same recipe (fixed epochs, no early stopping:
    fine-tuning runs `fine_tune_epochs`, the median epoch the cross-validation's folds kept)."""
    from .model import build_classifier

    log(f"final model: all {len(cells)} images of {len(set(cells.subjects.tolist()))} subjects")
    head, loss = train_head(with_augmented(features, augmented), cells, config)
    final = {"loss": loss, "epochs": config.epochs, "train_subjects": sorted(set(cells.subjects.tolist()))}
    epochs = config.fine_tune_epochs if fine_tune_epochs is None else fine_tune_epochs
    if epochs:
        model, record = fine_tune(head, cells, replace(config, fine_tune_epochs=epochs), weights, log)
        final.update(fine_tune_epochs=epochs, fine_tune_loss=record["loss"])
        return model, final
    return build_classifier(config.image_size, head, weights, config.scales), final


def config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
