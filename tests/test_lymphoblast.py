"""The lymphoblast plugin: preprocessing, calibration, thresholds, a tiny training run, the
shipped weights and the evaluate command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import DEFAULT_VERSION, FIXTURES, PREVIOUS_VERSION, ROOT, once_per_run

IMAGENET = ROOT.parent / "shared" / "weights" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5"
from dxserve_lymphoblast.calibration import Thresholds, calibrated, choose_thresholds, expected_calibration_error, fit_temperature
from dxserve_lymphoblast.preprocess import crop_to_cell, model_input, prepare


def cell(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def synthetic_cell(size: int = 120, radius: int = 30, centre=(40, 70), colour=(130, 70, 150)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((size, size, 3), np.uint8)
    image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2] = colour
    return image


def test_crop_centres_the_cell_with_a_margin():
    out = crop_to_cell(synthetic_cell())
    assert out.shape[0] == out.shape[1] and 61 <= out.shape[0] <= 70
    mask = out.max(axis=-1) > 12
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert abs((rows[0] + rows[-1]) / 2 - out.shape[0] / 2) <= 1.5
    assert rows[0] > 0 and cols[0] > 0  # black margin kept


def test_crop_of_a_cell_at_the_border_is_padded_black():
    out = crop_to_cell(synthetic_cell(centre=(5, 5)))
    assert out.shape[0] == out.shape[1] and out[0, 0].max() == 0


def test_prepare_is_scale_invariant(cell_paths):
    rgb = cell(cell_paths[0])
    small = np.asarray(Image.fromarray(rgb).resize((225, 225), Image.Resampling.LANCZOS))
    a, b = prepare(rgb, 64), prepare(small, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.abs(a - b).mean() < 0.03


@pytest.mark.parametrize("height, width", [(1000, 25000), (16, 1_562_500), (5000, 5000)])
def test_preprocessing_memory_is_proportional_to_pixels(height, width):
    """Extreme aspect ratios inside the server's 25 Mpx limit: the peak memory that
    preprocessing adds (RSS of a fresh process) stays under 12 bytes a pixel (measured: at most 8.2). Padding the
    cell's box to a square first cost 2.4 GB for 1000 x 25000 px and failed for 16 x 1.5 M."""
    import subprocess
    import sys

    code = f"""
import resource, numpy as np
from dxserve_lymphoblast.preprocess import model_input
rgb = np.full(({height}, {width}, 3), 120, np.uint8)
rgb[:, : {width} // 10] = 0  # some black background
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
record = model_input(rgb, 224)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert record["cell"].shape == (224, 224, 3)
print((after - before) * 1024)
"""
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 12 * height * width, f"{grown / (height * width):.1f} bytes a pixel"


def test_a_normal_cell_is_cropped_as_before(cell_paths):
    """The memory-bounded path only changes images whose cell square is over twice the input size."""
    rgb = cell(cell_paths[0])
    square = crop_to_cell(rgb)
    np.testing.assert_array_equal(crop_to_cell(rgb, 224), square)
    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 3, rgb.shape[0] * 3), Image.Resampling.LANCZOS))
    shrunk = crop_to_cell(big, 96)  # a square of about 3 x 200 px, shrunk by 3 before padding
    assert shrunk.shape[0] < crop_to_cell(big).shape[0] / 2
    assert np.abs(prepare(big, 96) - prepare(rgb, 96)).mean() < 0.03


def test_a_window_shows_every_cell_at_one_scale():
    """With `window`, the square is that many canvas pixels whatever the cell's size, centred
    on it, so a larger cell fills more of the model's input; a cell too large for the window
    gets its own square, never a cut; the crop-to-cell square instead fills the frame with any cell."""
    from dxserve_lymphoblast.preprocess import cell_square, foreground_mask, model_input

    small, large = synthetic_cell(300, 30, (150, 150)), synthetic_cell(300, 45, (150, 150))
    fraction = lambda image, **kw: (crop_to_cell(image, **kw).max(axis=-1) > 12).mean()  # noqa: E731
    assert crop_to_cell(small, window=200).shape == crop_to_cell(large, window=200).shape == (200, 200, 3)
    assert fraction(large, window=200) / fraction(small, window=200) == pytest.approx((45 / 30) ** 2, rel=0.05)
    assert fraction(large) == pytest.approx(fraction(small), rel=0.05)
    top, left, side = cell_square(foreground_mask(small), 200)
    assert (top + side // 2, left + side // 2, side) == (150, 150, 200)
    huge = synthetic_cell(300, 120, (150, 150))
    cropped = crop_to_cell(huge, window=200)
    assert cropped.shape[0] > 240 and (cropped.max(axis=-1) > 12).sum() == (huge.max(axis=-1) > 12).sum()
    mask = foreground_mask(large)
    np.testing.assert_array_equal(model_input(large, 64, mask, 200)["cell"], model_input(large, 64, window=200)["cell"])
    assert not np.array_equal(model_input(large, 64, window=200)["cell"], model_input(large, 64)["cell"])


def test_the_card_describes_the_heads_and_the_input():
    """As the shipped cards say it: one head, as 2.0.0's; three averaged, as 2.1.0's; a window."""
    from dxserve_lymphoblast.cli import architecture
    from dxserve_lymphoblast.plugin import find_version
    from dxserve_lymphoblast.train import TrainConfig

    for version, config in ((PREVIOUS_VERSION, TrainConfig()), (DEFAULT_VERSION, TrainConfig(heads=3))):
        assert architecture(config, 768) == find_version(version).extra["card"]["architecture"]
    assert architecture(TrainConfig(), 768).count("MLP (64 units, dropout 0.3) -> 1 logit") == 1
    assert architecture(TrainConfig(window=320), 768).endswith("RGB of a 320 px square of the canvas centred on the cell")


def test_the_card_says_which_mix_of_cells_its_probabilities_are_calibrated_at():
    """The default's card is its renderer's output (so it cannot go stale), and it tells a reader
    what P means on another mix of cells: the odds scale by the ratio of the priors' odds."""
    from dxserve_lymphoblast.card import CARD_MARKDOWN, _prior_note, read_card, render_markdown
    from dxserve_lymphoblast.plugin import MODELS_DIR

    shipped = MODELS_DIR / DEFAULT_VERSION
    assert (shipped / CARD_MARKDOWN).read_text() == render_markdown(read_card(shipped))
    assert "69 % lymphoblasts" in (shipped / CARD_MARKDOWN).read_text()  # 3,339 of 4,809 developer cells
    assert "at 20 % blasts, P = 0.50 here stands for 0.20." in _prior_note({"images": 10, "lymphoblasts": 5})
    assert "stands for 0.50." in _prior_note({"images": 10, "lymphoblasts": 2})


def test_averaged_heads_serve_the_mean_of_their_logits(tmp_path):
    import keras

    from dxserve_lymphoblast.model import averaged_heads, build_head

    heads = [build_head(8, 4, feature_stats=(np.zeros(8), np.ones(8))) for _ in range(3)]
    rng = np.random.default_rng(0)
    x = {"features": rng.normal(size=(16, 8)).astype(np.float32), "log_diameter": rng.normal(5, 0.2, (16, 1)).astype(np.float32)}
    logits = [head.predict(x, verbose=0) for head in heads]
    assert np.ptp([z.mean() for z in logits]) > 0  # the heads differ, so a mean is not any one of them
    ensemble = averaged_heads(heads)
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), np.mean(logits, axis=0), atol=1e-6)
    ensemble.save(tmp_path / "head.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "head.keras", compile=False).predict(x, verbose=0),
                               np.mean(logits, axis=0), atol=1e-6)


def test_stain_normalisation_cancels_a_colour_cast(cell_paths):
    from dxserve_lymphoblast.model import StainNormalisation

    x = prepare(cell(cell_paths[0]), 64)[None]
    cast = np.clip(x * np.array([0.8, 1.15, 0.9], np.float32), 0, 1)
    layer = StainNormalisation((0.5, 0.3, 0.55))
    a, b = np.asarray(layer(x)), np.asarray(layer(cast))
    assert np.abs(x - cast).mean() > 0.02
    assert np.abs(a - b).mean() < 0.01


def test_temperature_scaling_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-z / 2.5))).astype(int)  # logits twice too sharp
    t = fit_temperature(z, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(1 / (1 + np.exp(-z)), labels)
    after = expected_calibration_error(1 / (1 + np.exp(-z / t)), labels)
    assert before > 0.05 and after < 0.02


def test_ece_of_perfect_and_of_overconfident_predictions():
    labels = np.array([1, 0] * 50)
    assert expected_calibration_error(np.where(labels == 1, 1.0, 0.0), labels) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(100, 0.99), labels) == pytest.approx(0.49, abs=0.01)


def test_ece_floor_is_the_sampling_noise_of_a_calibrated_model():
    """A perfectly calibrated model's binned ECE is not 0 on a finite set: the floor shrinks with
    more cells, and labels drawn from the probabilities themselves land near it."""
    from dxserve_lymphoblast.calibration import ece_floor

    rng = np.random.default_rng(3)
    small, large = rng.uniform(0, 1, 300), rng.uniform(0, 1, 30_000)
    assert ece_floor(small) > 0.05 > 0.01 > ece_floor(large)  # about 1 / sqrt(cells)
    assert ece_floor(small) == ece_floor(small)  # seeded
    drawn = [expected_calibration_error(small, (rng.random(300) < small).astype(int)) for _ in range(100)]
    assert np.mean(drawn) == pytest.approx(ece_floor(small), rel=0.15)


def test_thresholds_meet_the_sensitivity_target_and_bound_the_band():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(700, int), np.zeros(300, int)]
    p = np.clip(np.r_[rng.beta(5, 2, 700), rng.beta(2, 5, 300)], 0, 1)
    th = choose_thresholds(p, labels, target_sensitivity=0.95, max_indeterminate=0.15)
    assert th.screen(p)[labels == 1].mean() >= 0.95
    assert th.lower <= 0.5 <= th.upper  # a called label is always the more probable one
    decision = th.decide(p)
    assert (decision == -1).mean() <= 0.15
    decided = decision >= 0
    assert (decision[decided] == labels[decided]).mean() > ((p >= 0.5) == labels).mean()


def test_a_call_never_contradicts_the_probabilities():
    """Even an old card whose band lies below 0.5 never calls the less probable label."""
    th = Thresholds(operating_point=0.17, lower=0.12, upper=0.25, target_sensitivity=0.95, target_decided_accuracy=0.95)
    p = np.array([0.05, 0.2, 0.38, 0.5, 0.9])
    assert th.decide(p).tolist() == [0, -1, -1, 1, 1]  # 0.38 is not called lymphoblast
    assert th.screen(p).tolist() == [False, True, True, True, True]  # but it is screen-positive
    th = Thresholds(operating_point=0.3, lower=0.2, upper=0.8, target_sensitivity=0.95, target_decided_accuracy=0.95)
    assert th.decide(np.array([0.1, 0.2, 0.5, 0.79, 0.8])).tolist() == [0, -1, -1, -1, 1]
    assert "screen-positive at P >= 0.300" in th.describe()


def test_decision_reports_call_screen_and_rule(shipped_runtime):
    t = shipped_runtime.thresholds
    for p in (0.01, (t.operating_point + min(t.lower, 0.5)) / 2, 0.5, 0.99):
        d = shipped_runtime.decide(np.array([p, 1 - p]))
        assert d.screen_positive == (p >= t.operating_point)
        assert shipped_runtime.version.version in d.rule and "screen-positive" in d.rule
        if not d.indeterminate:
            assert d.label == ("lymphoblast" if p >= 0.5 else "normal")


def test_sample_weights_balance_classes_and_temper_large_subjects():
    from dxserve_lymphoblast.data import sample_weights

    labels = np.array([1] * 100 + [1] * 4 + [0] * 20)
    groups = np.array(["P1"] * 100 + ["P2"] * 4 + ["H1"] * 20)
    w = sample_weights(labels, groups, 0.5)
    assert w[labels == 1].sum() == pytest.approx(w[labels == 0].sum())
    assert w[100] / w[0] == pytest.approx(5.0)  # sqrt(100 / 4)
    w = sample_weights(labels, groups, 0.5, balance_classes=False)
    assert w[labels == 1].sum() == pytest.approx(104) and w[labels == 0].sum() == pytest.approx(20)


def test_bootstrap_intervals_are_over_subjects():
    from dxserve_lymphoblast.metrics import bootstrap_over_subjects

    rng = np.random.default_rng(0)
    groups = np.repeat([f"S{i}" for i in range(20)], 30)
    labels = np.repeat(np.arange(20) % 2, 30)
    # Every subject is separable except a few, so the interval must be wide, not image-level narrow.
    p = np.where(labels == 1, 0.8, 0.2) + np.repeat(np.where(np.arange(20) < 4, 0.5 - 0.8 * (np.arange(20) % 2), 0), 30)
    p = np.clip(p + rng.normal(0, 0.05, len(p)), 0, 1)
    result = bootstrap_over_subjects(p, labels, groups, resamples=300)
    lo, hi = result["auroc_95ci"]
    assert lo < 0.95 < hi or hi - lo > 0.05
    assert 0 <= result["weighted_f1_95ci"][0] <= result["weighted_f1_95ci"][1] <= 1


def test_augmented_copies_change_the_cell_not_the_background(cell_paths):
    from dxserve_lymphoblast.features import augmented

    images = np.stack([(prepare(cell(p), 64) * 255).astype(np.uint8) for p in cell_paths])
    copy = augmented(images, seed=0)
    assert copy.shape == images.shape and copy.dtype == np.uint8
    assert np.abs(copy.astype(int) - images).mean() > 2  # changed
    background = copy.max(axis=-1) <= 12
    assert 0.2 < background.mean() < 0.9  # still a cell on black
    np.testing.assert_array_equal(augmented(images, seed=0), copy)  # reproducible by seed


def test_the_plain_release_is_the_default_version():
    from dxserve_lymphoblast.plugin import _version_key

    names = ["1.9.0", "2.0.0-tta8", "1.10.0", "2.0.0", "2.0.0-rc1", "1.2.0"]
    assert sorted(names, key=_version_key, reverse=True) == ["2.0.0", "2.0.0-tta8", "2.0.0-rc1", "1.10.0", "1.9.0", "1.2.0"]


def test_imagenet_weights_with_a_wrong_hash_are_refused(tmp_path):
    from dxserve_lymphoblast.backbone import WeightsHashMismatch, imagenet_weights

    fake = tmp_path / "mobilenet.h5"
    fake.write_bytes(b"not the ImageNet weights")
    with pytest.raises(WeightsHashMismatch, match="refusing"):
        imagenet_weights(fake)
    with pytest.raises(FileNotFoundError):
        imagenet_weights(tmp_path / "missing.h5")


def _train_tiny_version(root: Path, models: Path, cell_paths) -> None:
    """`dxserve-lymphoblast train` end to end on the fixture cells at 32 px, into `models`/0.0.1."""
    from dxserve_lymphoblast.cli import main

    # Four rotated copies of each cell, each under its own subject id: 24 subjects.
    for path in cell_paths:
        for k in range(4):
            Image.fromarray(np.rot90(cell(path), k)).save(root / path.name.replace("UID_", f"UID_{k}"))
    notes = models / "notes.md"
    notes.write_text("- **A recipe tried beside this one**: AUROC 0.5, not shipped.\n")
    # The real ImageNet file where the developers' layout has it (hash-checked); random weights elsewhere.
    weights = str(IMAGENET) if IMAGENET.exists() else "none"
    assert main(["train", "--data", str(root), "--version", "0.0.1", "--out", str(models), "--cache", str(models / "cache"),
                 "--image-size", "32", "--scales", "32", "--epochs", "2", "--folds", "2", "--imagenet-weights", weights,
                 "--window", "300", "--heads", "2", "--notes", str(notes)]) == 0


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory, cell_paths):
    """A version trained end to end on the fixture cells at 32 px: trained once per test run (the
    first xdist worker to need it trains it under a lock, the others wait), then copied, so each
    module works on its own copy."""
    import shutil

    from dxserve_lymphoblast.data import load_cells

    def make(folder: Path) -> None:
        (folder / "cells").mkdir()
        (folder / "models").mkdir()
        _train_tiny_version(folder / "cells", folder / "models", cell_paths)

    shared = once_per_run(tmp_path_factory, "tiny-version", make)
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(shared / "models", models, dirs_exist_ok=True)
    version_dir = models / "0.0.1"
    report = json.loads((version_dir / "model_card.json").read_text())["evaluation"]
    return version_dir, report, load_cells(shared / "cells", 32, cache_dir=None, workers=1, window=300)


def test_training_never_overwrites_a_version_unless_told(tiny_version, capsys):
    from dxserve_lymphoblast.cli import main

    version_dir, _, _ = tiny_version
    card = (version_dir / "model_card.json").read_bytes()
    assert main(["train", "--version", "0.0.1", "--out", str(version_dir.parent)]) == 2  # refused before any work
    assert "exists" in capsys.readouterr().err and (version_dir / "model_card.json").read_bytes() == card


def test_fine_tuning_keeps_the_epoch_best_on_unseen_subjects_and_trains_only_the_top_blocks(tiny_version):
    """fine_tuned_fold chooses the epochs on an inner subject-grouped fold that its probe head
    never saw (the probe's epoch 0 is a head fitted without those subjects), keeps the epoch with
    the best AUROC there (the frozen head, epoch 0, included), and leaves the blocks below
    `fine_tune_from` as they were."""
    import keras
    from sklearn.metrics import roc_auc_score

    from dxserve_lymphoblast.backbone import imagenet_weights
    from dxserve_lymphoblast.data import grouped_folds
    from dxserve_lymphoblast.features import extract
    from dxserve_lymphoblast.model import build_classifier
    from dxserve_lymphoblast.train import TrainConfig, classifier_logits, fine_tune, fine_tuned_fold, train_head

    _, _, cells = tiny_version
    weights = imagenet_weights(IMAGENET) if IMAGENET.exists() else None
    config = TrainConfig(image_size=32, scales=(32,), epochs=2, fine_tune_epochs=3, fine_tune_learning_rate=1e-3)
    features = extract(cells.images, weights, config.scales, log=lambda _: None)
    fit_idx, inner_idx = grouped_folds(cells, 5, config.seed)[0]
    fit_on, inner = cells.subset(fit_idx), cells.subset(inner_idx)
    assert not set(fit_on.subjects.tolist()) & set(inner.subjects.tolist())
    head, _ = train_head(features, cells, config)
    model, record = fine_tuned_fold(head, features, cells, config, weights, log=lambda _: None)

    runs = len(record["loss"])
    assert 1 <= runs <= 3 and len(record["inner_auroc"]) == runs + 1 and len(record["epoch_seconds"]) == runs
    kept = record["epoch_kept"]
    assert kept == int(np.argmax(record["inner_auroc"]))
    assert runs == 3 or runs - kept >= config.fine_tune_patience  # stopped early only after no gain
    # Epoch 0 was scored by a head fitted on the other subjects only, not by `head`.
    probe, _ = train_head(features[fit_idx], fit_on, config)
    keras.utils.set_random_seed(config.seed)  # as fine_tune does: the same start when weights are random
    unseen = roc_auc_score(inner.labels, classifier_logits(build_classifier(32, probe, weights, config.scales), inner, 1))
    assert record["inner_auroc"][0] == pytest.approx(unseen, abs=1e-6)
    # The probe's best epoch is the one fine_tune returns.
    keras.utils.set_random_seed(config.seed)
    before = build_classifier(32, probe, weights, config.scales).get_layer("backbone")
    tuned, again = fine_tune(probe, fit_on, config, weights, log=lambda _: None, inner=inner)
    assert again["epoch_kept"] == kept
    assert roc_auc_score(inner.labels, classifier_logits(tuned, inner, 1)) == pytest.approx(record["inner_auroc"][kept], abs=1e-6)
    after = tuned.get_layer("backbone")
    assert np.array_equal(after.get_layer("conv1").get_weights()[0], before.get_layer("conv1").get_weights()[0])
    changed = not np.array_equal(after.get_layer("conv_dw_12").get_weights()[0], before.get_layer("conv_dw_12").get_weights()[0])
    assert changed == (kept > 0)
    # The fold's model: `head` itself when no epoch paid, else `head` fine-tuned on every training cell.
    same_as_head = np.array_equal(model.get_layer("backbone").get_layer("conv_dw_12").get_weights()[0],
                                  before.get_layer("conv_dw_12").get_weights()[0])
    assert same_as_head == (kept == 0)


def test_cross_validation_with_fine_tuning_scores_each_fold_by_the_model_it_kept(tiny_version):
    """A fold whose fine-tuning kept no epoch is scored by its frozen head (from the cached
    features); one that kept an epoch, by its fine-tuned classifier."""
    from dxserve_lymphoblast.backbone import imagenet_weights
    from dxserve_lymphoblast.features import extract
    from dxserve_lymphoblast.train import FROZEN_HEAD, MODEL, TrainConfig, cross_validate

    _, _, cells = tiny_version
    weights = imagenet_weights(IMAGENET) if IMAGENET.exists() else None
    config = TrainConfig(image_size=32, scales=(32,), epochs=2, folds=2, fine_tune_epochs=1, fine_tune_learning_rate=1e-3)
    features = extract(cells.images, weights, config.scales, log=lambda _: None)
    report, oof = cross_validate(cells, features, config, weights, log=lambda _: None)

    records = report["fine_tuning"]["folds"]
    assert len(records) == 2
    for k, record in enumerate(records):
        here = oof.fold == k
        same = np.array_equal(oof.logits[MODEL][here], oof.logits[FROZEN_HEAD][here])
        assert same == (record["epoch_kept"] == 0), (k, record)


def test_cross_validation_reports_baselines_beside_the_model(tiny_version):
    from dxserve_lymphoblast.baselines import FROZEN_LOGISTIC, SIZE_ALONE

    _, report, cells = tiny_version
    assert len(report["folds"]) == 2
    for fold in report["folds"]:
        assert 0 <= fold["weighted_f1"] <= 1 and fold["temperature"] > 0
    assert set(report["across_folds"]["weighted_f1"]) == {"mean", "std", "min", "max"}
    assert "indeterminate_fraction" in report["pooled_out_of_fold"]
    assert set(report["pooled_out_of_fold"]["per_subject"]) == set(cells.subjects.tolist())
    for name in (SIZE_ALONE, FROZEN_LOGISTIC, "model", "model, 8-view averaging"):
        candidate = report["candidates"][name]
        assert len(candidate["folds"]) == 2 and 0 <= candidate["pooled_out_of_fold"]["weighted_f1"] <= 1
        assert candidate["bootstrap_over_subjects"]["resamples"] > 0
    versus = report["versus_baselines"][SIZE_ALONE]
    model, size = report["candidates"]["model"], report["candidates"][SIZE_ALONE]
    assert versus["auroc"]["per_fold"] == pytest.approx([a["auroc"] - b["auroc"] for a, b in zip(model["folds"], size["folds"])])
    assert versus["weighted_f1"]["pooled"] == pytest.approx(
        model["pooled_out_of_fold"]["weighted_f1"] - size["pooled_out_of_fold"]["weighted_f1"])


def test_size_baseline_is_the_cells_size(tiny_version):
    """The size-alone logits are a monotone function of the log diameter within each fold."""
    import csv

    version_dir, _, cells = tiny_version
    with (version_dir / "out_of_fold.csv").open() as f:
        rows = list(csv.DictReader(f))
    diameters = dict(zip(cells.paths.tolist(), cells.log_diameters.tolist()))
    for fold in {r["fold"] for r in rows}:
        here = sorted((diameters[r["path"]], float(r["logit: size alone (logistic on log diameter)"])) for r in rows if r["fold"] == fold)
        logits = [z for _, z in here]
        assert logits == sorted(logits) or logits == sorted(logits, reverse=True)


def test_training_writes_out_of_fold_predictions_and_plots(tiny_version):
    import csv

    version_dir, report, cells = tiny_version
    with (version_dir / "out_of_fold.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(cells.paths.tolist())
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subject"], set()).add(r["fold"])
    assert all(len(folds) == 1 for folds in by_subject.values())  # a subject sits in one fold only
    assert all(0 <= float(r["p_lymphoblast"]) <= 1 for r in rows)
    for name in ("roc.png", "reliability.png", "confusion.png"):
        assert (version_dir / name).stat().st_size > 1000
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["calibration"]["temperature"] > 0 and "out-of-fold" in card["calibration"]["fitted_on"]
    assert card["training"]["final"]["train_subjects"] == sorted(set(cells.subjects.tolist()))
    assert len(card["training"]["final"]["loss"]) == card["training"]["epochs"] == 2
    if IMAGENET.exists():
        assert card["initialisation"]["sha256"] == "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf"
    assert "size_alone" in card["baselines"]
    # What was tried and not shipped, and the per-fold ECE beside its floor, are in both renderings.
    assert card["not_shipped"] == "- **A recipe tried beside this one**: AUROC 0.5, not shipped."
    markdown = (version_dir / "MODEL_CARD.md").read_text()
    assert "## Tried for this version and not shipped\n\n- **A recipe tried beside this one**" in markdown
    floor = card["evaluation"]["across_folds"]["ece_floor"]["mean"]
    assert f"would show {floor:.3f} on folds of these sizes" in markdown


def test_a_new_version_is_compared_with_the_one_it_replaces_in_the_same_folds(tiny_version, tmp_path):
    """versus_version scores both versions' cross-fitted probabilities fold by fold, and refuses
    a version whose folds are not this run's (another split would compare different subjects)."""
    import csv

    from dxserve_lymphoblast.train import MODEL, OutOfFold, versus_version

    version_dir, _, cells = tiny_version
    with (version_dir / "out_of_fold.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    fold = np.array([int(rows[p]["fold"]) - 1 for p in cells.paths])
    theirs = np.array([float(rows[p]["p_lymphoblast"]) for p in cells.paths])
    ours = np.where(cells.labels == 1, 0.9, 0.1)  # right about every cell: better AUROC, F1 and ECE in each fold
    oof = OutOfFold({}, fold, cells, {MODEL: ours})
    against = versus_version(oof, "0.0.1", version_dir / "out_of_fold.csv")
    assert against["version"] == "0.0.1" and len(against["folds"]) == 2
    for k, f in enumerate(against["folds"]):
        here = fold == k
        assert f["ece"] == pytest.approx([expected_calibration_error(ours[here], cells.labels[here]),
                                          expected_calibration_error(theirs[here], cells.labels[here])])
    assert against["folds_better"]["ece"] == 2 and against["mean_ece"][0] == pytest.approx(0.1, abs=1e-9)
    assert versus_version(OutOfFold({}, fold, cells, {MODEL: theirs}), "0.0.1", version_dir / "out_of_fold.csv")["folds_better"] == \
        {"auroc": 0, "weighted_f1": 0, "ece": 0}  # the same predictions are better nowhere
    assert versus_version(OutOfFold({}, 1 - fold, cells, {MODEL: ours}), "0.0.1", version_dir / "out_of_fold.csv") is None
    assert versus_version(oof, "0.0.1", tmp_path / "missing.csv") is None


def test_written_version_loads_and_serves(tiny_version, cell_paths):
    from dxserve.runtime import sha256_of
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    version_dir, _, _ = tiny_version
    version, tta = sorted(shipped_versions(version_dir.parent), key=lambda v: v.version)
    # train exports the served LiteRT file too; the -tta8 variant serves the same file with 8 views
    assert tta.version == "0.0.1-tta8" and tta.weights == (version_dir / "model.tflite").resolve()
    assert tta.weights_sha256 == version.weights_sha256  # the same weights, served another way
    assert version.weights_sha256 == sha256_of(version_dir / "model.tflite")
    keras_version, _ = sorted(shipped_versions(version_dir.parent, runtime="tensorflow"), key=lambda v: v.version)
    assert keras_version.weights_sha256 == sha256_of(version_dir / "model.keras")
    import h5py
    import zipfile

    with zipfile.ZipFile(version_dir / "model.keras") as archive, archive.open("model.weights.h5") as weights:
        assert "optimizer" not in h5py.File(weights)  # weights only: no optimizer state shipped
    assert "# Model card: lymphoblast classifier 0.0.1" in version.model_card
    runtime = LymphoblastRuntime(version)
    runtime.load()
    batch = np.stack([runtime.preprocess(cell(p)) for p in cell_paths])
    # The recipe's window and heads are the served model's: a 300 px square of the canvas, two heads averaged.
    assert runtime.window == 300 and json.loads(version.model_card_json)["input"]["window"] == 300
    np.testing.assert_array_equal(batch[0]["cell"], model_input(cell(cell_paths[0]), 32, window=300)["cell"])
    keras_runtime = LymphoblastRuntime(keras_version)
    keras_runtime.load()
    assert {"head_0", "head_1"} <= {layer.name for layer in keras_runtime.model.get_layer("head").layers}
    np.testing.assert_allclose(keras_runtime.predict(batch), runtime.predict(batch), atol=1e-5)  # the export is the model
    p = runtime.predict(batch)
    assert p.shape == (6, 2) and np.allclose(p.sum(axis=1), 1)
    assert len(runtime.predict_with_issues(batch).issues) == 6 and runtime.ood is not None  # an OOD model per version
    decisions = [runtime.decide(row) for row in p]
    assert all(d.label in ("lymphoblast", "normal", "indeterminate") for d in decisions)
    averaged = LymphoblastRuntime(tta)
    averaged.load()
    assert averaged.views == 8 and runtime.views == 1
    # Averaging over orientations makes the result the same for a rotated or mirrored cell.
    flipped = batch.copy()
    flipped["cell"] = np.rot90(batch["cell"], 1, axes=(1, 2))[:, :, ::-1]
    np.testing.assert_allclose(averaged.predict(batch), averaged.predict(flipped), atol=1e-4)


def test_shipped_weights_match_their_card():
    from dxserve.runtime import sha256_of
    from dxserve_lymphoblast.plugin import shipped_versions

    versions = shipped_versions(runtime="tensorflow")
    assert versions, "no shipped weights"
    for version in versions:
        card = json.loads(version.model_card_json)
        assert sha256_of(version.weights) == card["weights"]["sha256"] == version.weights_sha256
        assert version.weights.stat().st_size <= 20 * 1024 * 1024
        if "litert" in card:  # the served file (issue 30): every 2.x version has one
            assert sha256_of(version.weights.parent / Path(card["litert"]["file"]).name) == card["litert"]["sha256"]
        for key in ("evaluation", "calibration", "thresholds", "intended_use", "limitations", "data"):
            assert key in card
    served = {v.version: v for v in shipped_versions()}
    assert all(served[v].weights.name == "model.tflite" for v in served if v.startswith("2."))


@pytest.fixture(scope="module")
def shipped_runtime():
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    runtime = LymphoblastRuntime(shipped_versions()[0])
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def tensorflow_runtime():
    """The default version served by TensorFlow (DXSERVE_LYMPHOBLAST_RUNTIME=tensorflow)."""
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    runtime = LymphoblastRuntime(shipped_versions(runtime="tensorflow")[0])
    runtime.load()
    return runtime


DEVELOPER_CELLS = ROOT.parent / "shared" / "data" / "cnmc2019"


def developer_cells(every: int = 24, count: int = 200) -> list[np.ndarray]:
    """Every `every`-th developer-set cell (C-NMC), `count` of them; the fixture cells where the
    shared data is not beside the repository."""
    from dxserve_lymphoblast.data import read_manifest

    if not (DEVELOPER_CELLS / "manifest.csv").exists():
        return [cell(p) for p in sorted((FIXTURES / "cells").glob("*.png"))]
    return [cell(DEVELOPER_CELLS / r["path"]) for r in read_manifest(DEVELOPER_CELLS)[::every][:count]]


def test_litert_serves_what_tensorflow_serves(shipped_runtime, tensorflow_runtime):
    """Issue 30: the default version on LiteRT (its `model.tflite`, the area resize as a convolution,
    the [-1, 1] scaling folded into conv1) gives the TensorFlow path's probabilities to 1e-5, the same out-of-distribution
    issues and the same decisions, on 200 developer cells in batches of 1, 5 and 12 (padded to
    the planned interpreters' sizes), and names its own file and hash."""
    assert shipped_runtime.version.weights.name == "model.tflite" and tensorflow_runtime.version.weights.name == "model.keras"
    assert shipped_runtime.version.weights_sha256 == shipped_runtime.version.extra["card"]["litert"]["sha256"]
    records = np.stack([shipped_runtime.preprocess(c) for c in developer_cells()])
    for size in (1, 5, 12):
        for start in range(0, min(len(records), 10 * size), size):
            batch = records[start:start + size]
            lite, tf_ = shipped_runtime.predict_with_issues(batch), tensorflow_runtime.predict_with_issues(batch)
            np.testing.assert_allclose(lite.probabilities, tf_.probabilities, atol=1e-5, rtol=0)
            assert [[i.code for i in item] for item in lite.issues] == [[i.code for i in item] for item in tf_.issues]
            assert [shipped_runtime.decide(p).label for p in lite.probabilities] == \
                [tensorflow_runtime.decide(p).label for p in tf_.probabilities]


def test_litert_views_are_the_training_views():
    """litert.views_of (OpenCV's turns and flips, straight into place) gives exactly the views
    training made (`features.view`), in its order, for every count of views up to 8; a
    non-square cell is refused, not turned into garbage."""
    from dxserve_lymphoblast.features import view
    from dxserve_lymphoblast.litert import views_of

    cells = np.random.default_rng(1).integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    for views in range(1, 9):
        np.testing.assert_array_equal(views_of(cells, views), np.concatenate([view(cells, k) for k in range(views)]))
    with pytest.raises(ValueError, match="square cells only"):
        views_of(cells[:, :8], 2)


def test_the_exported_area_resize_is_resize_area():
    """export.area_resize (what LiteRT runs) equals TensorFlow's ResizeArea at 224 -> 128 (the served
    scale: a 7 px -> 4 px convolution) and 224 -> 112 to 1e-6, and at an odd ratio (224 -> 97, whose
    weights never repeat: the matrix products) to 5e-5 (ResizeArea computes its spans in float32)."""
    import tensorflow as tf

    from dxserve_lymphoblast.export import area_resize

    images = np.random.default_rng(0).random((2, 224, 224, 3), np.float32)
    for size, tolerance in ((128, 1e-6), (112, 1e-6), (97, 5e-5)):
        np.testing.assert_allclose(area_resize(tf.constant(images), size).numpy(),
                                   tf.image.resize(images, (size, size), method="area").numpy(), atol=tolerance, rtol=0)


def test_the_exported_backbone_on_centred_pixels_is_the_backbone(shipped_runtime):
    """export.centred_backbone (conv1's kernel divided by 127.5, on x - 127.5) gives the shipped
    backbone's features of x / 127.5 - 1 at both served scales, to float rounding."""
    import keras
    import tensorflow as tf

    from dxserve_lymphoblast.export import centred_backbone

    model = keras.models.load_model(shipped_runtime.version.extra["folder"] / "model.keras", compile=False)
    backbone = model.get_layer("backbone")
    centred = centred_backbone(backbone, np.asarray(backbone.get_layer("conv1").kernel))
    for size in (224, 128):
        pixels = np.random.default_rng(size).integers(0, 256, (2, size, size, 3)).astype(np.float32)
        expected = backbone(tf.constant(pixels / 127.5 - 1), training=False)
        for got, want in zip(centred(tf.constant(pixels - 127.5)), expected, strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * float(np.abs(want).max()), rtol=0)


def test_site_statistics_normalise_the_sites_cells_at_every_scale(shipped_runtime, cell_paths):
    """adabn.adapted_backbones: on the cells it was given, each scale's first batch norm now sees
    inputs of mean 0 and spread 1 (in its own units), where the parent's, fitted on ImageNet, does
    not; the parent's model is left as it was."""
    import keras

    from dxserve_lymphoblast.adabn import adapted_backbones, batch_norm_layers
    from dxserve_lymphoblast.litert import views_of

    model = keras.models.load_model(shipped_runtime.version.extra["folder"] / "model.keras", compile=False)
    parent = model.get_layer("backbone")
    before = np.asarray(batch_norm_layers(parent)[0].moving_mean).copy()
    cast = np.array([0.8, 0.9, 1.15])  # another lab's stain
    cells = np.stack([shipped_runtime.prepare(np.clip(np.asarray(Image.open(p).convert("RGB")) * cast, 0, 255).astype(np.uint8))[0]["cell"]
                      for p in cell_paths for _ in range(4)])
    scales = shipped_runtime.version.extra["card"]["training"]["scales"]
    adapted = adapted_backbones(model, cells, scales, shipped_runtime.views, batch=8)
    assert sorted(adapted) == sorted(scales)

    def normalised(backbone, scale):  # conv1's output in its batch norm's units: (x - mean) / sqrt(var + eps)
        x = model.get_layer("to_symmetric")(views_of(cells, shipped_runtime.views).astype(np.float32) / 255.0)
        x = x if scale == cells.shape[1] else model.get_layer(f"resize_{scale}")(x)
        out = np.asarray(keras.Model(backbone.input, backbone.get_layer("conv1").output)(x)).reshape(-1, 8)
        bn = batch_norm_layers(backbone)[0]
        return ((out - np.asarray(bn.moving_mean)) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon))[:, live]

    # Channels the cells make vary (some of conv1's are all but constant: their spread is epsilon's).
    live = np.asarray(batch_norm_layers(adapted[scales[0]])[0].moving_variance) > 0.01
    assert live.sum() >= 4
    for scale in scales:
        z = normalised(adapted[scale], scale)
        assert np.abs(z.mean(axis=0)).max() < 0.05 and np.abs(z.std(axis=0) - 1).max() < 0.1, scale
        z_parent = normalised(parent, scale)
        assert np.abs(z_parent.mean(axis=0)).max() > 0.3 or np.abs(z_parent.std(axis=0) - 1).max() > 0.3
    np.testing.assert_array_equal(np.asarray(batch_norm_layers(parent)[0].moving_mean), before)


def test_fine_tuning_trains_the_full_size_cnn_and_head_and_keeps_the_sites_statistics(shipped_runtime, cell_paths):
    """finetune.py: features computed as the folds score them equal the served graph's full-size
    columns; a fine-tuning moves the convolutions and the head towards the labels, never the
    batch-norm statistics or the parent's backbone; 0 epochs change nothing."""
    import keras

    from dxserve_lymphoblast.adabn import adapted_backbones, batch_norm_layers
    from dxserve_lymphoblast.adaptation import design, fit_head, graph_of, head_logit
    from dxserve_lymphoblast.finetune import Schedule, fine_tuned, pooled_features
    from dxserve_lymphoblast.litert import LiteRTModel

    model = keras.models.load_model(shipped_runtime.version.extra["folder"] / "model.keras", compile=False)
    cast, views = np.array([0.8, 0.9, 1.15]), shipped_runtime.views
    records = np.stack([shipped_runtime.prepare(np.rot90(np.clip(np.asarray(Image.open(p).convert("RGB")) * cast, 0, 255)
                                                         .astype(np.uint8), k))[0] for p in cell_paths for k in range(4)])
    y = np.array([p.stem.endswith("_all") for p in cell_paths for _ in range(4)], int)
    scales, size = shipped_runtime.version.extra["card"]["training"]["scales"], shipped_runtime.image_size
    backbones = adapted_backbones(model, records["cell"], scales, views, batch=8)
    graph, _ = graph_of(model, scales, backbones, records["cell"], views, "the parent's, unchanged")
    _, served = LiteRTModel(graph, views)(records["cell"], records["log_diameter"])
    full = pooled_features(backbones[size], records["cell"], views)
    np.testing.assert_allclose(full, served[:, :full.shape[1]], atol=1e-3 * np.abs(served).max())

    x = design(served.astype(np.float64), records["log_diameter"].astype(np.float64))
    head = fit_head(x, y, (x.mean(axis=0), x.std(axis=0) + 1e-6), c=1e-4)  # weak: room to learn
    fixed = x[:, full.shape[1]:]
    same, same_head = fine_tuned(backbones[size], head, records["cell"], fixed, y, Schedule(epochs=0))
    assert all(np.array_equal(a, b) for a, b in zip(same.get_weights(), backbones[size].get_weights(), strict=True))
    assert all(np.allclose(same_head[k], head[k]) for k in head)

    parent_weights = [w.copy() for w in model.get_layer("backbone").get_weights()]
    tuned, tuned_head = fine_tuned(backbones[size], head, records["cell"], fixed, y, Schedule(epochs=6, learning_rate=1e-3))

    def margin(h, features):  # mean logit of the lymphoblasts less that of the normal cells
        z = head_logit(h, np.column_stack([features, fixed]))
        return z[y == 1].mean() - z[y == 0].mean()

    assert margin(tuned_head, pooled_features(tuned, records["cell"], views)) > margin(head, full) + 0.5
    assert not np.allclose(np.asarray(tuned.get_layer("conv1").kernel), np.asarray(backbones[size].get_layer("conv1").kernel))
    for mine, site in zip(batch_norm_layers(tuned), batch_norm_layers(backbones[size]), strict=True):
        np.testing.assert_array_equal(np.asarray(mine.moving_mean), np.asarray(site.moving_mean))
        np.testing.assert_array_equal(np.asarray(mine.moving_variance), np.asarray(site.moving_variance))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_layer("backbone").get_weights(), parent_weights, strict=True))


def test_the_runtime_setting_is_checked(monkeypatch):
    from dxserve_lymphoblast import plugin

    monkeypatch.setenv(plugin.RUNTIME_ENV, "onnx")
    with pytest.raises(ValueError, match="expected one of litert, tensorflow"):
        plugin.chosen_runtime()
    monkeypatch.setenv(plugin.RUNTIME_ENV, "TensorFlow")
    assert {v.extra["runtime"] for v in plugin.shipped_versions()} == {"tensorflow"}


def on_canvas(rgb: np.ndarray, side: int, offset: tuple[int, int]) -> np.ndarray:
    """The same cell, same magnification, on another lab's canvas size and position."""
    cell_only = crop_to_cell(rgb)
    canvas = np.zeros((side, side, 3), np.uint8)
    y, x = offset
    canvas[y:y + cell_only.shape[0], x:x + cell_only.shape[1]] = cell_only
    return canvas


def test_shipped_model_is_robust_to_canvas_and_stain(shipped_runtime, cell_paths):
    """Another lab's image of the same cell: another canvas size and position barely matter;
    a colour cast moves P(lymphoblast) somewhat (2.x has no stain normalisation: it cost
    AUROC in cross-validation; benchmarks/robustness.py measures the effect)."""
    originals, moved, cast = [], [], []
    for path in cell_paths:
        rgb = cell(path)
        other = on_canvas(rgb, 600, (20, 250))
        originals.append(shipped_runtime.preprocess(rgb))
        moved.append(shipped_runtime.preprocess(other))
        tinted = np.clip(other.astype(np.float32) * np.array([1.12, 0.88, 1.05]) + 6 * (other > 0), 0, 255).astype(np.uint8)
        cast.append(shipped_runtime.preprocess(tinted))
    p = shipped_runtime.predict(np.stack(originals))[:, 0]
    q = shipped_runtime.predict(np.stack(moved))[:, 0]
    r = shipped_runtime.predict(np.stack(cast))[:, 0]
    assert np.abs(p - q).max() < 0.02, (p, q)
    assert np.abs(p - r).mean() < 0.1 and np.abs(p - r).max() < 0.25, (p, r)


def test_shipped_model_uses_cell_size(shipped_runtime, cell_paths):
    """Size is an explicit input: the same cell shown 1.5x larger looks more like a blast."""
    rgb = cell(cell_paths[3])
    bigger = np.asarray(Image.fromarray(rgb).resize((675, 675), Image.Resampling.LANCZOS))
    p = shipped_runtime.predict(np.stack([shipped_runtime.preprocess(rgb), shipped_runtime.preprocess(bigger)]))[:, 0]
    assert p[1] > p[0]


def test_evaluate_command_writes_report_and_plots(tmp_path):
    from dxserve_lymphoblast.cli import main

    assert main(["evaluate", "--data", str(FIXTURES / "cells"), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 6 and report["lymphoblasts"] == 3
    assert set(report["per_subject"]) == {"P11", "P34", "P51", "H10", "H11", "H22"}
    for key in ("weighted_f1", "sensitivity", "specificity", "auroc", "ece", "indeterminate_fraction", "confusion_matrix"):
        assert key in report
    # The size-alone rule stored with the default version, scored on the same images, beside the model.
    size = report["baselines"]["size alone (logistic on log diameter)"]
    assert size["images"] == 6 and 0 <= size["weighted_f1"] <= 1
    assert report["versus_baselines"]["size alone (logistic on log diameter)"]["auroc"] == pytest.approx(report["auroc"] - size["auroc"])
    for name in ("roc.png", "reliability.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.parametrize("version", [v.version for v in __import__("dxserve_lymphoblast.plugin", fromlist=["x"]).shipped_versions()])
def test_every_shipped_version_loads_and_predicts(version, cell_paths):
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    runtime = LymphoblastRuntime(next(v for v in shipped_versions() if v.version == version))
    runtime.load()
    p = runtime.predict(np.stack([runtime.preprocess(cell(path)) for path in cell_paths]))
    assert p.shape == (6, 2) and np.allclose(p.sum(axis=1), 1)


def test_the_frozen_graph_serves_what_the_model_computes(tensorflow_runtime, cell_paths, monkeypatch):
    """The runtime serves its tf.function with the weights folded into constants (`plugin.frozen`):
    the same logits and CNN features as the unfrozen function, to float32 reassociation, and the
    probabilities to 1e-5, on the fixture cells in batches of 1, 6 and 17."""
    import tensorflow as tf

    from dxserve_lymphoblast import plugin

    shipped_runtime = tensorflow_runtime
    monkeypatch.setattr(plugin, "frozen", lambda function: function)
    unfrozen_runtime = plugin.LymphoblastRuntime(shipped_runtime.version)
    unfrozen_runtime.load()
    records = np.stack([shipped_runtime.preprocess(cell(p)) for p in cell_paths])
    for n in (1, 6, 17):
        batch = records[np.arange(n) % len(records)]
        inputs = {"cell": batch["cell"], "log_diameter": batch["log_diameter"][:, None]}
        served, unfrozen = shipped_runtime._forward(inputs), unfrozen_runtime._forward(inputs)
        assert tf.nest.is_nested(served) == tf.nest.is_nested(unfrozen)  # the same structure: logits, features
        for a, b in zip(tf.nest.flatten(served), tf.nest.flatten(unfrozen), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
        logits = tf.nest.flatten(unfrozen)[0].numpy()[:, 0]
        expected = calibrated(logits, shipped_runtime.temperature)
        np.testing.assert_allclose(shipped_runtime.predict(batch)[:, 0], expected, atol=1e-5)


def test_shipped_default_classifies_the_known_fixture_cells(shipped_runtime, cell_paths):
    """A regression check on six known cells (three of each class), not a tuning target:
    the default's calls must agree with their labels."""
    assert shipped_runtime.version.version == DEFAULT_VERSION
    batch = np.stack([shipped_runtime.preprocess(cell(p)) for p in cell_paths])
    for path, row in zip(cell_paths, shipped_runtime.predict(batch)):
        expected = "lymphoblast" if path.stem.endswith("_all") else "normal"
        assert shipped_runtime.decide(row).label == expected, (path.name, row)


def generated_images(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Images that are not one well-imaged segmented cell, made from a real one."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    small = np.asarray(Image.fromarray(rgb).resize((150, 150), Image.Resampling.LANCZOS))
    return {
        "blank": np.zeros_like(rgb),
        "white": np.full_like(rgb, 255),
        "grey": np.full_like(rgb, 128),
        "noise": rng.integers(0, 256, rgb.shape, dtype=np.uint8),
        "saturated": np.where(rgb > 12, 255, 0).astype(np.uint8),
        "nine cells tiled": np.tile(small, (3, 3, 1)),
        "cell cut in half": np.ascontiguousarray(crop_to_cell(rgb)[:, crop_to_cell(rgb).shape[1] // 2:]),
        "blurred": np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(5))),
        "recoloured": np.roll(rgb, 1, axis=-1),
        "unsegmented (light background)": np.where(rgb.max(axis=-1, keepdims=True) <= 12, np.uint8(220), rgb),
    }


EXPECTED_GATE_CODES = {
    "blank": "NO_CELL", "white": "NOT_SEGMENTED", "grey": "NOT_SEGMENTED", "noise": "NOISE", "saturated": "SATURATED",
    "nine cells tiled": "MULTIPLE_CELLS", "cell cut in half": "CUT_BY_BORDER", "blurred": "OUT_OF_FOCUS",
    "recoloured": "COLOUR_OUT_OF_RANGE", "unsegmented (light background)": "NOT_SEGMENTED",
}


def test_quality_gate_refuses_what_is_not_one_well_imaged_cell(shipped_runtime, cell_paths):
    for path in cell_paths:
        rgb = cell(path)
        assert shipped_runtime.check_quality(rgb) == [], path.name  # real cells pass
        for kind, image in generated_images(rgb).items():
            codes = [issue.code for issue in shipped_runtime.check_quality(image)]
            assert EXPECTED_GATE_CODES[kind] in codes, (path.name, kind, codes)


def test_focus_falls_with_blur_and_a_3px_blur_is_refused(shipped_runtime, cell_paths):
    """Read in the cell's core, sharpness falls with every step of blur (read near the edge, a
    1 px blur measured *sharper*), and 3 px of blur is out of focus for every sample cell."""
    from dxserve_lymphoblast.gate import measure

    for path in cell_paths:
        rgb = cell(path)
        blurred = [np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(r))) if r else rgb for r in (0, 1, 2, 3)]
        sharpness = [measure(b)["sharpness"] for b in blurred]
        assert sharpness == sorted(sharpness, reverse=True), (path.name, sharpness)
        assert "OUT_OF_FOCUS" in [i.code for i in shipped_runtime.check_quality(blurred[3])], path.name


def test_quality_gate_ships_in_the_card_with_its_developer_pass_rate(shipped_runtime):
    gate = shipped_runtime.version.extra["card"]["quality_gate"]
    assert gate["developer_set"]["pass_rate"] >= 0.99 and gate["developer_set"]["images"] > 4000
    assert "## Input quality gate" in shipped_runtime.version.model_card
    issue = shipped_runtime.check_quality(np.zeros((450, 450, 3), np.uint8))[0]
    assert issue.code == "NO_CELL" and issue.value == 0 and issue.accepted_min > 0 and "outside the training range" in issue.message


def test_quality_gate_fit_from_files(tmp_path, cell_paths):
    from dxserve_lymphoblast.gate import fit_on_files

    gate = fit_on_files([str(p) for p in cell_paths] * 3, workers=1)
    assert gate["developer_set"]["pass_rate"] == 1.0  # the fitted ranges hold the cells they were fitted on
    low, high = gate["ranges"]["log_diameter"]
    assert low < high


def checkered_cell(rgb: np.ndarray) -> np.ndarray:
    """A cell's outline filled with a checkerboard in stain colours: it passes the pixel gate
    (one segmented object, in range) but is nothing the model was trained on."""
    mask = rgb.max(axis=-1) > 12
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    texture = ((yy // 6 + xx // 6) % 2 * 120 + 60).astype(np.uint8)
    out = np.zeros_like(rgb)
    out[mask] = np.stack([texture, texture // 2, texture], axis=-1)[mask]
    return out


def test_out_of_distribution_score_on_cnn_features(shipped_runtime, cell_paths):
    cells = [cell(p) for p in cell_paths]
    real = shipped_runtime.predict_with_issues(np.stack([shipped_runtime.preprocess(c) for c in cells]))
    assert all(list(found) == [] for found in real.issues)
    odd = [checkered_cell(c) for c in cells]
    assert all(shipped_runtime.check_quality(o) == [] for o in odd[:2])  # the pixel gate lets them through
    flagged = shipped_runtime.predict_with_issues(np.stack([shipped_runtime.preprocess(o) for o in odd]))
    for (issue,) in flagged.issues:
        assert issue.code == "OUT_OF_DISTRIBUTION" and issue.value > issue.accepted_max
    np.testing.assert_allclose(flagged.probabilities, shipped_runtime.predict(np.stack([shipped_runtime.preprocess(o) for o in odd])))


def test_ood_model_fits_flags_and_refuses_a_tampered_file(tmp_path):
    from dxserve_lymphoblast import ood

    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (2000, 16)) @ rng.normal(0, 1, (16, 16))
    model = ood.fit(train)
    assert (ood.distance(train, model) > model["threshold"]).mean() == pytest.approx(0.005, abs=0.002)
    far = train[:3] + 50 * rng.normal(0, 1, (3, 16))
    assert all(found and found[0].code == "OUT_OF_DISTRIBUTION" for found in ood.issues(far, model))
    entry = ood.save(model, tmp_path)
    np.testing.assert_allclose(ood.load(tmp_path, entry)["threshold"], model["threshold"])
    (tmp_path / entry["file"]).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="refusing"):
        ood.load(tmp_path, entry)


def test_ood_threshold_is_set_on_subjects_the_fit_did_not_see(tmp_path):
    """Subjects differ: an in-sample percentile flags far more than 0.5 % of a new subject's
    ordinary cells; the out-of-fold one keeps to about 0.5 %."""
    from dxserve_lymphoblast import ood

    rng = np.random.default_rng(1)
    subjects = np.repeat(np.arange(40), 60)
    x = rng.normal(0, 1, (len(subjects), 24)) + rng.normal(0, 0.8, (40, 24))[subjects]  # a shift per subject
    folds = subjects % 5
    in_sample, out_of_fold = ood.fit(x), ood.fit(x, folds=folds)
    assert out_of_fold["threshold"] > in_sample["threshold"]
    new = rng.normal(0, 1, (3000, 24)) + rng.normal(0, 0.8, (50, 24)).repeat(60, axis=0)  # 50 unseen subjects
    flagged = lambda model: (ood.distance(new, model) > model["threshold"]).mean()  # noqa: E731
    assert flagged(in_sample) > 0.01 and flagged(out_of_fold) < flagged(in_sample) / 2
    entry = ood.fit_and_save(x, folds, tmp_path)
    assert entry["flagged_out_of_fold"] == pytest.approx(0.005, abs=0.002) and entry["in_sample_threshold_flagged_out_of_fold"] > 0.01


@pytest.mark.parametrize("version", [DEFAULT_VERSION, f"{DEFAULT_VERSION}-tta8", PREVIOUS_VERSION, f"{PREVIOUS_VERSION}-tta8"])
def test_shipped_ood_threshold_is_out_of_fold(version):
    from dxserve_lymphoblast.plugin import find_version

    entry = find_version(version).extra["card"]["ood"]
    assert entry["threshold_from"].startswith("out-of-fold") and entry["flagged_out_of_fold"] == pytest.approx(0.005, abs=0.001)
    assert entry["threshold"] > entry["in_sample_threshold"] and entry["in_sample_threshold_flagged_out_of_fold"] > 0.03


def test_fit_gate_command_writes_every_variants_card(tiny_version, tmp_path):
    import shutil

    from dxserve_lymphoblast.cli import main
    from dxserve_lymphoblast.plugin import shipped_versions

    version_dir, _, _ = tiny_version
    models = tmp_path / "models"
    shutil.copytree(version_dir.parent, models, ignore=shutil.ignore_patterns("cache"))
    assert main(["fit-gate", "--data", str(FIXTURES / "cells"), "--version", "9.9.9", "--models", str(models)]) == 2
    assert main(["fit-ood", "--data", str(FIXTURES / "cells"), "--version", "9.9.9", "--models", str(models)]) == 2
    assert main(["fit-gate", "--data", str(FIXTURES / "cells"), "--version", "0.0.1", "--models", str(models)]) == 0
    gates = [json.loads(v.model_card_json)["quality_gate"] for v in shipped_versions(models)]
    assert len(gates) == 2 and gates[0] == gates[1] and gates[0]["developer_set"]["images"] == 6


def test_specimen_rule_needs_enough_cells_and_a_clear_interval():
    from dxserve import SpecimenCounts
    from dxserve_lymphoblast.specimen import SpecimenRule

    rule = SpecimenRule(min_called=20, positive_at_least=0.5, negative_below=0.5)
    decide = lambda blasts, normals, indeterminate=0: rule.decide(  # noqa: E731
        SpecimenCounts(blasts + normals + indeterminate, 0, blasts + normals, indeterminate,
                       {"lymphoblast": blasts, "normal": normals}), "9.9.9")
    assert decide(15, 0, indeterminate=40).label == "indeterminate"  # 15 called cells: too few, however clear
    assert decide(18, 2).label == "lymphoblast"  # 90 %, Wilson [0.70, 0.97]
    assert decide(2, 38).label == "normal"
    assert decide(13, 9).label == "indeterminate"  # 59 %, Wilson [0.39, 0.77] straddles 0.5
    assert decide(130, 90).label == "lymphoblast"  # the same 59 % of ten times the cells: [0.52, 0.66]
    d = decide(18, 2)
    assert not d.indeterminate and "9.9.9" in d.rule and "0.90" in d.reason


@pytest.mark.parametrize("version", [DEFAULT_VERSION, f"{DEFAULT_VERSION}-tta8", PREVIOUS_VERSION, f"{PREVIOUS_VERSION}-tta8"])
def test_shipped_specimen_rule_and_its_evaluation_are_reproducible(version):
    """The card's specimen section is what its rule gives on the out-of-fold predictions now."""
    from dxserve_lymphoblast.plugin import find_version
    from dxserve_lymphoblast.specimen import SpecimenRule, evaluate_out_of_fold

    v = find_version(version)
    card = v.extra["card"]
    again = evaluate_out_of_fold(SpecimenRule(**card["specimen"]["rule"]), card, v.weights.parent / "out_of_fold.csv")
    assert again == card["specimen"]
    outcomes = card["specimen"]["outcomes_by_true_label"]
    assert outcomes["lymphoblast"].get("normal", 0) == 0  # no ALL subject was called normal


def test_occlusion_map_finds_what_the_logit_depends_on():
    from dxserve_lymphoblast.explain import occlusion_map
    from dxserve_lymphoblast.preprocess import input_dtype

    record = np.zeros((), input_dtype(224))
    record["cell"][32:192, 32:192] = 128  # a square "cell" on black
    logits = lambda batch: batch["cell"][:, 96:128, 96:128].sum(axis=(1, 2, 3))  # noqa: E731  depends on one spot
    heat = occlusion_map(logits, record)
    assert heat.shape == (224, 224) and heat.max() == pytest.approx(1.0)
    assert heat[100:124, 100:124].min() > 0.5 and heat[:32].max() == 0 and heat[40:60, 40:60].max() == 0
    assert occlusion_map(logits, record, sign=-1.0).max() == 0  # hiding it never argues for the opposite label


def test_explanation_maps_back_onto_any_image_shape():
    from dxserve_lymphoblast.preprocess import cell_square, foreground_mask, to_image_coordinates

    for image in (synthetic_cell(), synthetic_cell(centre=(5, 5)), np.full((40, 900, 3), 120, np.uint8)):
        square = np.ones((224, 224), np.float32)
        placed = to_image_coordinates(square, image)
        assert placed.shape == image.shape[:2]
        assert placed[foreground_mask(image)].min() > 0.99  # the cell is always inside the square
        y0, x0, side = cell_square(foreground_mask(image))
        outside = np.ones(image.shape[:2], bool)
        outside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = False
        assert placed[outside].max(initial=0) == 0


def test_specimen_rule_command_writes_every_variants_card(tiny_version, tmp_path):
    import shutil

    from dxserve_lymphoblast.cli import main
    from dxserve_lymphoblast.plugin import shipped_versions

    version_dir, _, _ = tiny_version
    assert all("specimen" in json.loads(v.model_card_json) for v in shipped_versions(version_dir.parent))  # train wrote it
    models = tmp_path / "models"
    shutil.copytree(version_dir.parent, models, ignore=shutil.ignore_patterns("cache"))
    assert main(["specimen-rule", "--version", "9.9.9", "--models", str(models)]) == 2
    assert main(["specimen-rule", "--version", "0.0.1", "--models", str(models), "--min-called", "3"]) == 0
    rules = [json.loads(v.model_card_json)["specimen"]["rule"] for v in shipped_versions(models)]
    assert len(rules) == 2 and all(r["min_called"] == 3 for r in rules)


def test_served_answers_equal_the_recorded_reference():
    """Speed-ups of the per-image path must not move a decision: the fixture cells' probabilities
    (to 1e-5), quality issues and gate statistics, recorded from 2.0.0 before them
    (tests/fixtures/reference-2.0.0.json), through the path the server calls (`prepare`)."""
    from dxserve.images import to_rgb
    from dxserve_lymphoblast.gate import measure
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version

    reference = json.loads((FIXTURES / "reference-2.0.0.json").read_text())
    runtime = LymphoblastRuntime(find_version(reference["model_version"]))
    runtime.load()
    colour = runtime.version.extra["card"]["quality_gate"]["colour"]
    for name, expected in reference["cells"].items():
        rgb = to_rgb(Image.open(FIXTURES / "cells" / name))
        model_input, issues = runtime.prepare(rgb)
        p = runtime.predict_with_issues(model_input[None]).probabilities[0][0]
        assert abs(p - expected["p_lymphoblast"]) < 1e-5, name
        assert [i.code for i in issues] == expected["issues"], name
        # The focus filters' float32 sums run in OpenCV's order since: equal to 1e-6 of each value.
        assert measure(rgb, colour) == pytest.approx(expected["gate"], rel=1e-6, abs=1e-9), name


def test_the_gates_opencv_shortcuts_equal_scipy():
    """The quality gate's OpenCV versions of scipy's erosion, distance threshold and largest
    object give the same answers, pixel for pixel, on random masks (thin, holed, touching the
    edge); its focus filter equals scipy's Laplacian of the Gaussian to float32 rounding."""
    from scipy import ndimage

    from dxserve_lymphoblast.gate import deeper_than, eroded, focus, largest_object

    rng = np.random.default_rng(7)
    for trial in range(200):
        shape = (int(rng.integers(3, 90)), int(rng.integers(3, 90)))
        mask = ndimage.binary_opening(rng.random(shape) > rng.uniform(0.2, 0.7)) if trial % 2 else rng.random(shape) > 0.5
        for depth in (1, 3):
            np.testing.assert_array_equal(eroded(mask, depth), ndimage.binary_erosion(mask, iterations=depth), str(trial))
        for depth in (2, 6, 12):  # 12: the gate's CORE_DEPTH
            np.testing.assert_array_equal(deeper_than(mask, depth), ndimage.distance_transform_edt(mask) > depth, str(trial))
        labels, count = ndimage.label(mask)
        assert largest_object(mask) == (np.bincount(labels.ravel())[1:].max() if count else 0), trial
        if mask.any():
            grey = (rng.random(shape) * 255).astype(np.float32)
            scipy = np.abs(ndimage.laplace(ndimage.gaussian_filter(grey, 1.0)))[mask]
            # float32 sums in another order: a few 1e-4 where a Laplacian of values up to 255 cancels.
            np.testing.assert_allclose(focus(grey, mask), scipy, rtol=1e-5, atol=5e-4, err_msg=str(trial))
            assert focus(grey, mask).mean() == pytest.approx(scipy.mean(), rel=1e-5), trial
