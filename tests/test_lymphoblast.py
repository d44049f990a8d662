"""The lymphoblast plugin: preprocessing, calibration, thresholds, a tiny training run, the
shipped weights and the evaluate command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from dxserve_lymphoblast.calibration import Thresholds, choose_thresholds, expected_calibration_error, fit_temperature
from dxserve_lymphoblast.preprocess import crop_to_cell, prepare


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


def test_thresholds_meet_the_sensitivity_target_and_bound_the_band():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(700, int), np.zeros(300, int)]
    p = np.clip(np.r_[rng.beta(5, 2, 700), rng.beta(2, 5, 300)], 0, 1)
    th = choose_thresholds(p, labels, target_sensitivity=0.95, max_indeterminate=0.2)
    assert ((p >= th.operating_point) & (labels == 1)).sum() / 700 >= 0.95
    assert th.lower <= th.operating_point <= th.upper
    decision = th.decide(p)
    assert (decision == -1).mean() <= 0.2
    decided = decision >= 0
    assert (decision[decided] == labels[decided]).mean() > ((p >= th.operating_point) == labels).mean()


def test_thresholds_decide():
    th = Thresholds(operating_point=0.4, lower=0.3, upper=0.5, target_sensitivity=0.95, target_decided_accuracy=0.95)
    assert th.decide(np.array([0.1, 0.3, 0.45, 0.5, 0.9])).tolist() == [0, -1, -1, 1, 1]


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory, cell_paths):
    """`dxserve-lymphoblast train` end to end on the fixture cells at 32 px."""
    from dxserve_lymphoblast.cli import main
    from dxserve_lymphoblast.data import load_cells

    root = tmp_path_factory.mktemp("cells")
    # Four rotated copies of each cell, each under its own subject id: 24 subjects.
    for path in cell_paths:
        for k in range(4):
            Image.fromarray(np.rot90(cell(path), k)).save(root / path.name.replace("UID_", f"UID_{k}"))
    models = tmp_path_factory.mktemp("models")
    assert main(["train", "--data", str(root), "--version", "0.0.1", "--out", str(models), "--cache", str(models / "cache"),
                 "--image-size", "32", "--epochs", "2", "--folds", "2", "--patience", "1", "--batch-size", "8"]) == 0
    version_dir = models / "0.0.1"
    report = json.loads((version_dir / "model_card.json").read_text())["evaluation"]
    return version_dir, report, load_cells(root, 32, cache_dir=None, workers=1)


def test_cross_validation_reports_per_fold_and_per_subject(tiny_version):
    _, report, cells = tiny_version
    assert len(report["folds"]) == 2
    tested = [s for fold in report["folds"] for s in fold["per_subject"]]
    assert sorted(tested) == sorted(set(cells.subjects.tolist()))  # every subject tested exactly once
    for fold in report["folds"]:
        assert 0 <= fold["weighted_f1"] <= 1 and fold["temperature"] > 0
    assert set(report["across_folds"]["weighted_f1"]) == {"mean", "std", "min", "max"}
    assert "indeterminate_fraction" in report["pooled_out_of_fold"]


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
    # The shipped model sees every subject, for the folds' median best epoch.
    assert card["training"]["final"]["train_subjects"] == sorted(set(cells.subjects.tolist()))
    best = sorted(f["best_epoch"] for f in report["folds"])
    assert card["training"]["final"]["epochs"] == int(np.median(best))
    assert len(card["training"]["final"]["history"]["loss"]) == card["training"]["final"]["epochs"]


def test_written_version_loads_and_serves(tiny_version, cell_paths):
    from dxserve.runtime import sha256_of
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    version_dir, _, _ = tiny_version
    (version,) = shipped_versions(version_dir.parent)
    assert version.weights_sha256 == sha256_of(version_dir / "model.keras")
    import h5py
    import zipfile

    with zipfile.ZipFile(version_dir / "model.keras") as archive, archive.open("model.weights.h5") as weights:
        assert "optimizer" not in h5py.File(weights)  # weights only: no optimizer state shipped
    assert "# Model card: lymphoblast classifier 0.0.1" in version.model_card
    runtime = LymphoblastRuntime(version)
    runtime.load()
    batch = np.stack([runtime.preprocess(cell(p)) for p in cell_paths])
    p = runtime.predict(batch)
    assert p.shape == (6, 2) and np.allclose(p.sum(axis=1), 1)
    decisions = [runtime.decide(row) for row in p]
    assert all(d.label in ("lymphoblast", "normal", "indeterminate") for d in decisions)


def test_shipped_weights_match_their_card():
    from dxserve.runtime import sha256_of
    from dxserve_lymphoblast.plugin import shipped_versions

    versions = shipped_versions()
    assert versions, "no shipped weights"
    for version in versions:
        card = json.loads(version.model_card_json)
        assert sha256_of(version.weights) == card["weights"]["sha256"] == version.weights_sha256
        assert version.weights.stat().st_size <= 20 * 1024 * 1024
        for key in ("evaluation", "calibration", "thresholds", "intended_use", "limitations", "data"):
            assert key in card


@pytest.fixture(scope="module")
def shipped_runtime():
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    runtime = LymphoblastRuntime(shipped_versions()[0])
    runtime.load()
    return runtime


def on_canvas(rgb: np.ndarray, side: int, offset: tuple[int, int]) -> np.ndarray:
    """The same cell, same magnification, on another lab's canvas size and position."""
    cell_only = crop_to_cell(rgb)
    canvas = np.zeros((side, side, 3), np.uint8)
    y, x = offset
    canvas[y:y + cell_only.shape[0], x:x + cell_only.shape[1]] = cell_only
    return canvas


def test_shipped_model_is_robust_to_canvas_and_stain(shipped_runtime, cell_paths):
    """Another lab's image of the same cell: another canvas size and position, and a colour cast."""
    originals, shifted = [], []
    for path in cell_paths:
        rgb = cell(path)
        other = on_canvas(rgb, 600, (20, 250)).astype(np.float32)
        other = np.clip(other * np.array([1.12, 0.88, 1.05]) + 6 * (other > 0), 0, 255).astype(np.uint8)
        originals.append(shipped_runtime.preprocess(rgb))
        shifted.append(shipped_runtime.preprocess(other))
    p = shipped_runtime.predict(np.stack(originals))[:, 0]
    q = shipped_runtime.predict(np.stack(shifted))[:, 0]
    assert np.abs(p - q).max() < 0.1, (p, q)


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
    for name in ("roc.png", "reliability.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_greyscale_model_saves_and_loads(tmp_path):
    import keras

    from dxserve_lymphoblast.model import build_model

    model = build_model(32, stem=4, widths=(8,), mlp_units=4, grey=True)
    inputs = {"cell": np.random.default_rng(0).random((2, 32, 32, 3), np.float32), "log_diameter": np.full((2, 1), 5.0, np.float32)}
    model.save(tmp_path / "grey.keras")
    loaded = keras.models.load_model(tmp_path / "grey.keras", compile=False)
    assert loaded.get_layer("greyscale") is not None
    np.testing.assert_allclose(np.asarray(loaded(inputs)), np.asarray(model(inputs)), atol=1e-6)
