"""Site versions (issue 33): `dxserve site onboard` through lymphoblast's `adapt`, and a server
that serves a site version only while its validation meets the site's acceptance criteria,
its parent is unchanged and its weights match their hash."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DEFAULT_VERSION, FIXTURES, ServerProcess, wait_serving
from PIL import Image

from dxserve.cli import main as dxserve
from dxserve_client import Client, DxServeError
from dxserve.v1 import diagnostics_pb2 as pb

CELLS = sorted((FIXTURES / "cells").glob("*.png"))
SITE_VERSION = f"{DEFAULT_VERSION}+lab.1"


def as_another_lab(rgb: np.ndarray, k: int) -> np.ndarray:
    """The cell in orientation k, under a blue-ish stain cast (another lab's look)."""
    out = np.rot90(rgb, k % 4)
    out = out[:, ::-1] if k >= 4 else out
    cast = np.where(out.max(axis=2, keepdims=True) > 12, np.clip(out * np.array([0.85, 0.9, 1.1]), 13, 255), 0)
    return np.ascontiguousarray(cast.astype(np.uint8))


def write_another_lab(root: Path, group=lambda stem: stem) -> None:
    """root/labels.csv and root/labelled/: the six fixture cells as another lab's, 8 orientations
    each, grouped by `group(its stem)` (by default, by cell) (48); root/unlabelled/: 2 orientations
    each as JPEG (12), and one copy of a labelled file (the same bytes: onboarding leaves it out)."""
    write_labelled(root, "labelled", 8, group=group)
    (root / "unlabelled").mkdir()
    for path in CELLS:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for k in (1, 6):
            Image.fromarray(as_another_lab(rgb, k)).save(root / "unlabelled" / f"{path.stem}-{k}.jpg", quality=95)
    shutil.copy(root / "labelled" / f"{CELLS[0].stem}-0.png", root / "unlabelled" / "copy-of-a-labelled-cell.png")


def write_labelled(root: Path, folder: str, orientations: int, cast=lambda cell: cell, group=lambda stem: stem) -> Path:
    """root/labels.csv and root/<folder>/: each fixture cell as another lab's (`as_another_lab`) in
    `orientations` orientations, then through `cast`, labelled as its file name says and grouped by
    `group(its stem)`."""
    (root / folder).mkdir(parents=True)
    with (root / "labels.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "group"])
        for path in CELLS:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            for k in range(orientations):
                name = f"{folder}/{path.stem}-{k}.png"
                Image.fromarray(cast(as_another_lab(rgb, k))).save(root / name)
                out.writerow([name, "lymphoblast" if path.stem.endswith("_all") else "normal", group(path.stem)])
    return root / "labels.csv"


@pytest.fixture(scope="module")
def onboarded(tmp_path_factory):
    """A site version of the default, onboarded on the six fixture cells as another lab's: 48
    labelled images (8 orientations each, grouped by cell) and 12 unlabelled ones. The CNN is
    fine-tuned for 2 epochs, not 40 (`finetune.SCHEDULE`): the same steps in seconds."""
    from dxserve_lymphoblast import finetune

    root = tmp_path_factory.mktemp("site")
    write_another_lab(root)
    sites_dir = root / "sites"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "SCHEDULE", finetune.Schedule(epochs=2))
        code = dxserve(["site", "onboard", "--plugin", "lymphoblast", "--site", "lab", "--labelled", str(root / "labels.csv"),
                        "--unlabelled", str(root / "unlabelled"), "--sites-dir", str(sites_dir)])
    return root, sites_dir, code


def test_onboarding_writes_a_traceable_site_version(onboarded):
    from dxserve.runtime import sha256_of

    root, sites_dir, code = onboarded
    folder = sites_dir / "lymphoblast" / SITE_VERSION

    def strict(constant):
        raise AssertionError(f"site.json holds {constant}, which is not JSON")

    site = json.loads((folder / "site.json").read_text(), parse_constant=strict)  # NaN (a fold of one class) is null
    assert code == 1  # 48 labelled images: below the default criteria's 50, so made but not served
    assert site["version"] == SITE_VERSION and site["site"] == "lab" and site["parent"]["version"] == DEFAULT_VERSION
    from dxserve_lymphoblast.plugin import find_version

    assert site["parent"]["weights_sha256"] == find_version(DEFAULT_VERSION).weights_sha256
    assert site["weights"]["sha256"] == sha256_of(folder / site["weights"]["file"])
    assert len(site["labelled"]) == 48 and len(site["unlabelled"]) == 12  # the copy of a labelled cell left out
    assert site["report"]["unlabelled_images"] == 12
    assert site["labelled"]["labelled/UID_11_10_1_all-0.png"] == sha256_of(root / "labelled" / "UID_11_10_1_all-0.png")
    report = site["report"]
    assert report["labelled"] == {"images": 48, "groups": 6, "lymphoblast": 24, "normal": 24, "groups_of_one_class": 6}
    assert report["prevalence"] == {"calibrated_at": 0.5, "declared": False}  # no --prevalence: the labelled share
    for baseline in ("parent unadapted", "site head, the parent's batch-norm statistics", "site head, the site's batch-norm statistics",
                     "site head, the site's statistics, its full-size CNN fine-tuned", "size alone", "colour alone", "background alone"):
        assert 0.0 <= report["auroc"][baseline] <= 1.0 and len(report["auroc"][f"{baseline} interval"]) == 2
    # Segmented cells: the outer ring is black in every image, so background alone knows nothing. Every group is
    # one cell, so one class: each fold's model, read at its own level, ranks at chance (0.5), not backwards (the
    # held-out class is the one its training folds were short of; pooled raw, this read 0.06).
    assert report["auroc"]["background alone"] == 0.5
    groups = {g["group"]: g for g in report["per_group"]}  # each cell's 8 orientations, one group
    assert len(groups) == 6 and all(g["images"] == 8 and g["lymphoblast"] in (0, 8) and 0 <= g["right"] <= 1
                                    and g["called_right"] <= g["right"] and g["called_right"] + g["called_wrong"] <= 1
                                    for g in groups.values())
    # Every group is one cell, so one class: pooled over folds, each point of the curve is still a figure.
    assert set(report["learning_curve_auroc"]) == {"10", "25", "50", "100"}
    assert all(0.0 <= a <= 1.0 for a in report["learning_curve_auroc"].values())
    assert set(report["acceptance"]) == {"labelled", "auroc", "sensitivity_at_screen", "ece", "confidently_wrong",
                                         "margin_over_colour_alone"}
    assert "NOT met" in (folder / "MODEL_CARD.md").read_text() and "min_labelled" not in (folder / "MODEL_CARD.md").read_text()
    # A second onboarding of the same site is the next version, never an overwrite.
    from dxserve import sites

    assert sites.next_version(sites_dir, "lymphoblast", DEFAULT_VERSION, "lab") == f"{DEFAULT_VERSION}+lab.2"


def test_the_site_version_is_the_classifier_that_ranked_best_out_of_fold(onboarded):
    """The report's four candidates in the same folds; the site version is the best of them, and its
    weights file holds what that one needs: a head only for a site head, a graph only for the site's
    statistics."""
    from dxserve_lymphoblast.adaptation import FINE_TUNED, PARENT, PARENT_STATISTICS, SITE_STATISTICS, choose

    _, sites_dir, _ = onboarded
    folder = sites_dir / "lymphoblast" / SITE_VERSION
    site = json.loads((folder / "site.json").read_text())
    chosen, scores = site["head"]["classifier"], site["head"]["chosen_from"]
    assert set(scores) == {PARENT, PARENT_STATISTICS, SITE_STATISTICS, FINE_TUNED} and site["report"]["classifier"] == chosen
    assert site["report"]["auroc"]["site version"] == max(scores.values()) == scores[chosen]
    with np.load(folder / site["weights"]["file"]) as stored:
        assert ("coef" in stored.files) == (chosen != PARENT) and ("graph" in stored.files) == (chosen in (SITE_STATISTICS, FINE_TUNED))
    assert site["report"]["fine_tuning"]["fits"] == 5 + (chosen == FINE_TUNED)  # one a fold, and the site version's own
    y = np.array([0, 0, 1, 1])
    ranks_right, backwards = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.9, 0.8, 0.2, 0.1])
    assert choose({"parent": ranks_right, "head": backwards}, y)[0] == "parent"
    assert choose({"parent": backwards, "head": ranks_right}, y)[0] == "head"
    assert choose({"parent": ranks_right, "head": ranks_right}, y)[0] == "parent"  # a tie goes to the simpler
    assert choose({"parent": ranks_right, "head": ranks_right}, np.ones(4, int))[0] == "parent"  # no AUROC: still one


def test_a_site_version_with_the_sites_statistics_computes_with_its_own_graph(onboarded, tmp_path):
    """A site version whose weights file holds a graph (the site's batch-norm statistics): loaded as
    the server loads it, its CNN features are that graph's, not its parent's, and its head reads
    them; one without a head answers with its parent's own logit, calibrated."""
    from dxserve import sites
    from dxserve.runtime import sha256_of
    from dxserve_lymphoblast.adaptation import HEAD_FILE, design, fit_head, head_logit, site_graph
    from dxserve_lymphoblast.litert import LiteRTModel
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version, shipped_versions

    copy = tmp_path / "sites"
    shutil.copytree(onboarded[1], copy)
    folder = copy / "lymphoblast" / SITE_VERSION
    parent = LymphoblastRuntime(find_version(DEFAULT_VERSION))
    parent.load()
    images = [as_another_lab(np.asarray(Image.open(path).convert("RGB")), k) for path in CELLS for k in range(8)]
    y = np.array([path.stem.endswith("_all") for path in CELLS for _ in range(8)], int)
    cells = np.stack([parent.prepare(image)[0] for image in images])
    graph, entry = site_graph(parent, cells)
    assert "re-estimated on 48 of the site's 48 cells" in entry["batch_norm"]
    assert entry["max_feature_difference_from_tensorflow (relative)"] <= 1e-3
    _, features = LiteRTModel(graph, parent.views)(cells["cell"], cells["log_diameter"])
    x = design(features.astype(np.float64), cells["log_diameter"].astype(np.float64))
    head = fit_head(x, y, (x.mean(axis=0), x.std(axis=0) + 1e-6))

    def served(stored: dict) -> LymphoblastRuntime:
        np.savez(folder / HEAD_FILE, **stored)
        site = json.loads((folder / "site.json").read_text())
        site["weights"]["sha256"] = sha256_of(folder / HEAD_FILE)
        (folder / "site.json").write_text(json.dumps(site))
        versions, _ = sites.site_versions(copy, "lymphoblast", shipped_versions(), {})
        runtime = LymphoblastRuntime(next(v for v in versions if v.version == SITE_VERSION))
        runtime.load()
        return runtime

    runtime = served({**head, "platt": np.array([1.0, 0.0]), "graph": np.frombuffer(graph, np.uint8)})
    logits_parent, parents = parent._run_with_features(cells)
    _, own = runtime._run_with_features(cells)
    assert np.array_equal(own, features)
    assert np.abs(own - parents).max() > 0.1 * np.abs(parents).max()  # another CNN's statistics, not float noise
    np.testing.assert_allclose(runtime.predict(cells)[:, 0], 1 / (1 + np.exp(-head_logit(head, x))), atol=1e-6)
    runtime = served({"platt": np.array([2.0, -1.0])})  # the parent, calibrated
    np.testing.assert_allclose(runtime.predict(cells)[:, 0], 1 / (1 + np.exp(-(2.0 * logits_parent - 1.0))), atol=1e-6)


def a_site_that_fine_tunes(tmp_path, monkeypatch):
    """12 labelled images and 2 unlabelled of another lab in `tmp_path`, onboarding shortened to 2
    epochs and made to choose the fine-tuned CNN."""
    from dxserve_lymphoblast import adaptation, finetune
    from dxserve_lymphoblast.adaptation import FINE_TUNED

    write_labelled(tmp_path, "labelled", 2)
    (tmp_path / "unlabelled").mkdir()
    for path in CELLS[:2]:
        Image.fromarray(as_another_lab(np.asarray(Image.open(path).convert("RGB")), 5)).save(tmp_path / "unlabelled" / path.name)
    monkeypatch.setattr(finetune, "SCHEDULE", finetune.Schedule(epochs=2, learning_rate=1e-3))
    monkeypatch.setattr(adaptation, "choose", lambda candidates, y: (FINE_TUNED, {name: 0.5 for name in candidates}))


def test_a_fine_tuned_site_version_is_served_with_its_own_cnn(tmp_path, monkeypatch):
    """When the report chooses the fine-tuned CNN, the site version's weights file holds that CNN's
    graph (not the site statistics' graph: its features differ) and the head trained with it, and
    the server's site version answers with exactly them."""
    from dxserve import sites
    from dxserve_lymphoblast.adaptation import FINE_TUNED, HEAD_FILE, design, head_logit, site_graph
    from dxserve_lymphoblast.litert import LiteRTModel
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version, shipped_versions

    a_site_that_fine_tunes(tmp_path, monkeypatch)
    sites_dir = tmp_path / "sites"
    assert dxserve(["site", "onboard", "--plugin", "lymphoblast", "--site", "lab", "--labelled", str(tmp_path / "labels.csv"),
                    "--unlabelled", str(tmp_path / "unlabelled"), "--sites-dir", str(sites_dir)]) == 1  # 12 images: not served
    folder = sites_dir / "lymphoblast" / SITE_VERSION
    site = json.loads((folder / "site.json").read_text())
    assert site["head"]["classifier"] == FINE_TUNED and "fine-tuned" in site["backbone"]["weights"]
    assert site["report"]["fine_tuning"]["fits"] == 6  # 5 folds and the version's own
    with np.load(folder / HEAD_FILE) as stored:
        head = {key: stored[key].astype(np.float64) for key in stored.files if key != "graph"}
        assert "graph" in stored.files and "coef" in stored.files

    parent = LymphoblastRuntime(find_version(DEFAULT_VERSION))
    parent.load()
    cells = np.stack([parent.prepare(as_another_lab(np.asarray(Image.open(path).convert("RGB")), k))[0]
                      for path in CELLS for k in range(2)])
    versions, _ = sites.site_versions(sites_dir, "lymphoblast", shipped_versions(), {})  # loaded as the server loads it
    runtime = LymphoblastRuntime(next(v for v in versions if v.version == SITE_VERSION))
    runtime.load()
    _, own = runtime._run_with_features(cells)
    graph, _ = site_graph(parent, cells)
    _, statistics_only = LiteRTModel(graph, parent.views)(cells["cell"], cells["log_diameter"])
    assert np.abs(own - statistics_only).max() > 1e-2 * np.abs(statistics_only).max()  # trained, not rounding
    a, b = head["platt"]
    z = head_logit(head, design(own.astype(np.float64), cells["log_diameter"].astype(np.float64)))
    np.testing.assert_allclose(runtime.predict(cells)[:, 0], 1 / (1 + np.exp(-(a * z + b))), atol=1e-6)


def test_the_same_onboarding_twice_makes_the_same_site_version(tmp_path, monkeypatch):
    """A lab's quality manager re-runs the command on the same files and gets the version it
    validated: the same weights (SHA-256), the fine-tuned CNN's included, and the same report."""

    a_site_that_fine_tunes(tmp_path, monkeypatch)
    made = []
    for run in ("first", "second"):
        assert dxserve(["site", "onboard", "--plugin", "lymphoblast", "--site", "lab", "--labelled", str(tmp_path / "labels.csv"),
                        "--unlabelled", str(tmp_path / "unlabelled"), "--sites-dir", str(tmp_path / run)]) == 1
        made.append(json.loads((tmp_path / run / "lymphoblast" / SITE_VERSION / "site.json").read_text()))
    first, second = made
    assert first["weights"]["sha256"] == second["weights"]["sha256"]
    assert first["report"]["auroc"] == second["report"]["auroc"] and first["report"]["per_group"] == second["report"]["per_group"]


def test_a_lab_whose_patients_show_both_kinds_of_cell_is_onboarded(tmp_path, monkeypatch):
    """The lab issue 33 expects next: patient identifiers, both classes on the same slides. Three
    patients, each with blasts and normal cells: every fold holds both labels, so each fold's
    AUROC is a figure (with groups of one class a fold can hold one label, and its AUROC is
    null), and each patient's row counts both."""
    from dxserve_lymphoblast import finetune

    patients = {path.stem: f"patient-{i % 3}" for i, path in enumerate(CELLS)}  # 3 blasts, then 3 normal cells
    write_another_lab(tmp_path, group=lambda stem: patients[stem])
    monkeypatch.setattr(finetune, "SCHEDULE", finetune.Schedule(epochs=2))
    assert dxserve(["site", "onboard", "--plugin", "lymphoblast", "--site", "lab", "--labelled", str(tmp_path / "labels.csv"),
                    "--unlabelled", str(tmp_path / "unlabelled"), "--sites-dir", str(tmp_path / "sites")]) == 1  # 48 < 50 labelled
    report = json.loads((tmp_path / "sites" / "lymphoblast" / SITE_VERSION / "site.json").read_text())["report"]
    assert report["labelled"] == {"images": 48, "groups": 3, "lymphoblast": 24, "normal": 24, "groups_of_one_class": 0}
    assert len(report["auroc"]["per_fold"]) == 3 and all(0.0 <= a <= 1.0 for a in report["auroc"]["per_fold"])
    assert [(g["images"], g["lymphoblast"]) for g in report["per_group"]] == [(16, 8)] * 3
    assert 0.0 <= report["acceptance"]["auroc"] <= 1.0 and 0.0 <= report["acceptance"]["ece"] <= 1.0


def test_onboarding_without_the_training_stack_says_what_to_install(tmp_path, monkeypatch, capsys):
    """A serving install has no TensorFlow: onboarding exits 2 naming the extra, and leaves no folder."""
    import sys

    write_another_lab(tmp_path)
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras now raises ImportError
    code = dxserve(["site", "onboard", "--plugin", "lymphoblast", "--site", "lab", "--labelled", str(tmp_path / "labels.csv"),
                    "--unlabelled", str(tmp_path / "unlabelled"), "--sites-dir", str(tmp_path / "sites")])
    assert code == 2
    assert "pip install 'dxserve-lymphoblast[train]'" in capsys.readouterr().err
    assert not list((tmp_path / "sites").glob("lymphoblast/*"))


def test_a_site_calibration_never_flips_the_head():
    """Onboarded on 24 of Aria's cells in 9 groups, the out-of-fold logits ranked the labels
    backwards (AUROC 0.42); the Platt map fitted to them had a negative slope and turned a head
    that ranked held-out cells at 0.68 into one at 0.32, with no criterion able to see it on the
    held-out cells. A slope that is not positive is 0: every cell gets the labelled share."""
    from dxserve_lymphoblast.adaptation import fit_platt

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    backwards = (1 - 2 * y) * 2.0 + rng.normal(0, 1, len(y))
    assert fit_platt(backwards, y) == (0.0, pytest.approx(0.0))  # half of each: P = 0.5, indeterminate
    assert fit_platt(backwards, np.r_[y[:40], np.ones(20, int)])[1] == pytest.approx(np.log(40 / 20))
    a, _ = fit_platt(-backwards, y)
    assert a > 0.5  # a head that ranks the right way keeps its slope


def test_a_site_calibration_softens_what_overstates_across_groups_and_never_sharpens():
    """adaptation.soften: logits twice as sharp as the truth get a slope near 1/2; logits already
    calibrated, or too soft, are left alone (no map sharpens)."""
    from dxserve_lymphoblast.adaptation import soften

    rng = np.random.default_rng(0)
    truth = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-truth))).astype(int)
    c, d = soften(2 * truth, y)  # overstated
    assert 0.4 < c < 0.6 and abs(d) < 0.2
    assert soften(0.5 * truth, y) == (1.0, 0.0)  # understated: never sharpened
    c, _ = soften(truth, y)  # calibrated: a slope near 1, if any
    assert c > 0.9


def test_a_site_version_is_calibrated_to_the_prevalence_the_lab_declares():
    """Cells labelled half of each class rank best; a site whose cells are 80 % blasts declares it
    (`--prevalence 0.8`), and every map is calibrated to it, the cross-fitted ones too: the slope
    stays, the intercept moves by logit(0.8), and the probabilities hold at the site's own mix
    where the labelled share's read low. The report's calibration figures are read at it."""
    from dxserve_lymphoblast.adaptation import calibrate, folds_by_group
    from dxserve_lymphoblast.calibration import expected_calibration_error, mix_weights
    from scipy.special import expit, logit

    rng = np.random.default_rng(0)
    y, groups = np.repeat([0, 1], 100), np.repeat(np.arange(20), 10)  # groups of one class, as on Aria
    oof = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1, len(y))
    folds = folds_by_group(groups, y)
    labelled_share, declared = calibrate(oof, y, folds, 0.5), calibrate(oof, y, folds, 0.8)
    assert declared.a == pytest.approx(labelled_share.a, rel=0.1)
    assert declared.b - labelled_share.b == pytest.approx(logit(0.8), abs=0.15)
    weight = mix_weights(y, 0.8)
    assert weight.mean() == pytest.approx(1.0) and weight[y == 1].sum() / weight.sum() == pytest.approx(0.8)
    site = rng.random(4000) < 0.8  # the site's own cells
    x = np.where(site, 1.0, -1.0) + rng.normal(0, 1, len(site))
    assert expit(declared.a * x + declared.b).mean() == pytest.approx(site.mean(), abs=0.02)
    assert expit(labelled_share.a * x + labelled_share.b).mean() < site.mean() - 0.1  # blasts read low
    figures = declared.figures(y)
    assert figures["ece"] == round(expected_calibration_error(declared.p, y, weight=weight), 4)
    assert figures["ece"] < expected_calibration_error(declared.p, y) - 0.02  # read at 50/50, it would look off
    assert labelled_share.figures(y)["ece"] == round(expected_calibration_error(labelled_share.p, y), 4)


def test_each_group_says_what_the_version_would_answer_it():
    """per_group's "right" reads P against a half; called_right / called_wrong read the version's
    band, so a group the version leans wrong on but leaves indeterminate is told apart from one
    it calls wrong."""
    from dxserve_lymphoblast.adaptation import per_group
    from dxserve_lymphoblast.calibration import Thresholds

    band = Thresholds(operating_point=0.3, lower=0.2, upper=0.8, target_sensitivity=0.95, target_decided_accuracy=0.95)
    groups = np.repeat(["leans wrong", "called wrong", "mixed"], 4)
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.67, 0.7, 0.6, 0.75, 0.9, 0.95, 0.85, 0.7, 0.9, 0.5, 0.1, 0.85])
    rows = {g["group"]: g for g in per_group(groups, y, p, band)}
    assert rows["leans wrong"]["right"] == 0.0 and rows["leans wrong"]["mean_p"] == pytest.approx(0.68)
    assert (rows["leans wrong"]["called_right"], rows["leans wrong"]["called_wrong"]) == (0.0, 0.0)  # indeterminate
    assert (rows["called wrong"]["right"], rows["called wrong"]["called_wrong"]) == (0.0, 0.75)  # 0.7 in the band
    assert (rows["mixed"]["right"], rows["mixed"]["called_right"], rows["mixed"]["called_wrong"]) == (0.75, 0.5, 0.25)


def test_onboarding_takes_a_prevalence_only_where_it_can(onboarded, tmp_path, capsys, monkeypatch):
    """--prevalence reaches the plugin's `adapt`; a share outside (0, 1), or a plugin whose `adapt`
    takes none (a field plugin), is refused before anything is made."""
    from dxserve.config import Settings
    from dxserve.onboarding import onboard
    from dxserve_lymphoblast.plugin import LymphoblastRuntime

    root, _, _ = onboarded
    sites_dir = tmp_path / "sites"
    common = ["--site", "lab", "--labelled", str(root / "labels.csv"), "--unlabelled", str(root / "unlabelled"),
              "--sites-dir", str(sites_dir)]
    assert dxserve(["site", "onboard", *common, "--prevalence", "1.5"]) == 2
    assert "--prevalence 1.5: the share of lymphoblast among the site's images, between 0 and 1" in capsys.readouterr().err
    assert dxserve(["site", "onboard", "--plugin", "smear-field", *common, "--prevalence", "0.5"]) == 2
    assert "plugin 'smear-field' takes no --prevalence" in capsys.readouterr().err
    given = []

    def adapt(self, labelled, unlabelled, folder, prevalence=None):
        given.append(prevalence)
        raise KeyboardInterrupt  # stop here: what reached adapt is all this test reads

    monkeypatch.setattr(LymphoblastRuntime, "adapt", adapt)
    for prevalence in (0.8, None):
        with pytest.raises(KeyboardInterrupt):
            onboard(Settings(sites_dir=sites_dir, audit_db=""), "lymphoblast", "", "lab", root / "labels.csv",
                    root / "unlabelled", log=lambda _: None, prevalence=prevalence)
    assert given == [0.8, None]
    assert not list((sites_dir / "lymphoblast").iterdir())  # nothing half-made


def test_an_undefined_figure_never_meets_a_criterion():
    """NaN compares False with every bar, so an AUROC a report could not compute passed
    `auroc >= 0.8`; it is now a miss, and written as null."""
    from dxserve.sites import SiteAcceptance, json_safe, unmet

    figures = {"labelled": 100, "sensitivity_at_screen": 0.95, "ece": 0.02, "confidently_wrong": 0.0, "auroc": 0.9,
               "margin_over_colour_alone": 0.2}
    assert unmet({"acceptance": figures}, SiteAcceptance()) == []
    undefined = {**figures, "auroc": float("nan"), "ece": float("nan")}
    assert unmet({"acceptance": undefined}, SiteAcceptance()) == ["ece undefined (needs <= 0.1)",
                                                                 "auroc undefined (needs >= 0.8)"]
    assert json_safe({"per_fold": [0.9, float("nan")], "x": (float("inf"), 1)}) == {"per_fold": [0.9, None], "x": [None, 1]}


def test_the_background_baseline_reads_the_images_outer_ring():
    """'background alone' is a logistic on the colour of each labelled image's outer ring: black
    for a segmented cell (nothing to learn), the slide for a crop taken with it, where two
    classes stained in different batches differ before any cell is looked at."""
    from dxserve_lymphoblast.adaptation import border_colour

    segmented = np.zeros((100, 120, 3), np.uint8)
    segmented[30:70, 40:80] = (150, 90, 200)  # a cell on black
    assert border_colour(segmented).tolist() == [0.0, 0.0, 0.0]
    on_slide = np.full((100, 120, 3), (230, 200, 210), np.uint8)  # the same cell on a pink slide
    on_slide[30:70, 40:80] = (150, 90, 200)
    assert border_colour(on_slide).tolist() == [230.0, 200.0, 210.0]
    assert border_colour(np.full((3, 3, 3), 7, np.uint8)).tolist() == [7.0, 7.0, 7.0]  # smaller than the ring


def test_onboarding_refuses_what_it_cannot_use(onboarded, tmp_path, capsys):
    root, sites_dir, _ = onboarded
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label,group\nlabelled/UID_11_10_1_all-0.png,blast,1\n")
    (tmp_path / "labelled").symlink_to(root / "labelled")
    assert dxserve(["site", "onboard", "--site", "lab", "--labelled", str(bad), "--unlabelled", str(root / "unlabelled"),
                    "--sites-dir", str(sites_dir)]) == 2
    assert "label 'blast' is not one of lymphoblast, normal" in capsys.readouterr().err
    assert dxserve(["site", "onboard", "--site", "Lab 2", "--labelled", str(bad), "--unlabelled", str(root / "unlabelled"),
                    "--sites-dir", str(sites_dir)]) == 2
    assert dxserve(["site", "onboard", "--plugin", "nope", "--site", "lab", "--labelled", str(root / "labels.csv"),
                    "--unlabelled", str(root / "unlabelled"), "--sites-dir", str(sites_dir)]) == 2
    assert "no plugin 'nope'" in capsys.readouterr().err
    assert [p.name for p in (sites_dir / "lymphoblast").iterdir()] == [SITE_VERSION]  # nothing half-written


def test_onboarding_reads_a_seeded_sample_of_a_large_unlabelled_folder(onboarded, tmp_path, capsys):
    """A lab may point --unlabelled at thousands of cells: onboarding reads at most --max-unlabelled of
    them (default 2000), the same ones on every run, in path order, and lists only those."""
    from dxserve.onboarding import MAX_UNLABELLED, read_unlabelled

    root, _, _ = onboarded
    images, used, found = read_unlabelled(root / "unlabelled", set(), most=5)
    assert found == 13 and len(images) == len(used) == 5 and list(used) == sorted(used)
    assert read_unlabelled(root / "unlabelled", set(), most=5)[1] == used  # seeded
    assert set(used) <= {p.name for p in (root / "unlabelled").iterdir()}
    assert len(read_unlabelled(root / "unlabelled", set(), most=MAX_UNLABELLED)[1]) == 13 and MAX_UNLABELLED == 2000
    assert dxserve(["site", "onboard", "--site", "lab", "--labelled", str(root / "labels.csv"), "--unlabelled",
                    str(root / "unlabelled"), "--sites-dir", str(tmp_path), "--max-unlabelled", "0"]) == 2
    assert "--max-unlabelled 0: at least 1" in capsys.readouterr().err


def relaxed(tmp_path):
    """Acceptance criteria this tiny site meets (an operator's TOML)."""
    config = tmp_path / "dxserve.toml"
    config.write_text("[site_acceptance.lab]\nmin_labelled = 40\nmin_auroc = 0.0\nmin_sensitivity_at_screen = 0.0\n"
                      "max_ece = 1.0\nmax_confidently_wrong = 1.0\nmin_margin_over_colour_alone = -1.0\n")
    return config


def test_a_server_serves_a_site_version_only_while_it_meets_its_criteria(onboarded, tmp_path):
    _, sites_dir, _ = onboarded
    strict = ServerProcess("--sites-dir", str(sites_dir), tmp=tmp_path, env={"DXSERVE_DISABLED_PLUGINS": "smear_field"})
    served = ServerProcess("--sites-dir", str(sites_dir), "--config", str(relaxed(tmp_path)), tmp=tmp_path)
    try:
        wait_serving(strict.address, [None, "lymphoblast"])
        wait_serving(served.address, [None, "lymphoblast"])
        image = np.asarray(Image.open(CELLS[0]).convert("RGB"))
        with Client(strict.address) as client:
            versions = {v.version: v for v in next(p for p in client.list_plugins() if p.name == "lymphoblast").model_versions}
            assert versions[SITE_VERSION].state == pb.VERSION_STATE_NOT_SERVED
            assert "acceptance criteria declared for site 'lab'" in versions[SITE_VERSION].state_reason
            assert "labelled 48 (needs >= 50)" in versions[SITE_VERSION].state_reason
            with pytest.raises(DxServeError) as refused:
                client.classify(as_another_lab(image, 0), model_version=SITE_VERSION)
            assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SITE_NOT_ACCEPTED")
            assert client.classify(image).model_version == DEFAULT_VERSION  # never the default
        with Client(served.address) as client:
            site = json.loads((sites_dir / "lymphoblast" / SITE_VERSION / "site.json").read_text())
            result = client.classify(as_another_lab(image, 0), model_version=SITE_VERSION)
            assert result.ok and result.model_version == SITE_VERSION and result.weights_sha256 == site["weights"]["sha256"]
            assert abs(sum(result.probabilities.values()) - 1) < 1e-6
            listed = {v.version: v for v in next(p for p in client.list_plugins() if p.name == "lymphoblast").model_versions}
            assert json.loads(listed[SITE_VERSION].model_card_json)["parent"]["version"] == DEFAULT_VERSION
            assert client.classify(image).model_version == DEFAULT_VERSION
    finally:
        assert strict.stop() == 0 and served.stop() == 0


def test_an_altered_site_version_is_refused(onboarded, tmp_path):
    """Its weights changed after onboarding: FAILED on first use (hash), the default serves on;
    its parent named with other weights: NOT_SERVED, asking for onboarding again."""
    _, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    folder = copy / "lymphoblast" / SITE_VERSION
    site = json.loads((folder / "site.json").read_text())
    with (folder / site["weights"]["file"]).open("ab") as f:
        f.write(b"\0")
    changed = copy / "lymphoblast" / f"{DEFAULT_VERSION}+lab.2"
    shutil.copytree(folder, changed)
    other = {**site, "version": f"{DEFAULT_VERSION}+lab.2", "parent": {**site["parent"], "weights_sha256": "0" * 64}}
    (changed / "site.json").write_text(json.dumps(other))
    server = ServerProcess("--sites-dir", str(copy), "--config", str(relaxed(tmp_path)), tmp=tmp_path)
    try:
        wait_serving(server.address, [None, "lymphoblast"])
        with Client(server.address) as client:
            with pytest.raises(DxServeError) as corrupt:
                client.classify(CELLS[0], model_version=SITE_VERSION)
            assert corrupt.value.code == grpc.StatusCode.UNAVAILABLE and "SHA-256" in str(corrupt.value)
            with pytest.raises(DxServeError) as stale:
                client.classify(CELLS[0], model_version=f"{DEFAULT_VERSION}+lab.2")
            assert stale.value.reason == "SITE_NOT_ACCEPTED" and "onboard the site again" in str(stale.value)
            assert client.classify(CELLS[0]).ok
    finally:
        assert server.stop() == 0


def write_other_patients(root: Path, orientations: int = 8) -> Path:
    """root/labels.csv: the fixture cells under another stain cast than the onboarding's, so other
    files, in groups onboarding never saw ("other-<cell>"), `orientations` of each."""
    return write_labelled(root, "img", orientations, group=lambda stem: f"other-{stem}",
                          cast=lambda cell: np.where(cell > 12, np.clip(cell.astype(int) - 6, 13, 255), 0).astype(np.uint8))


def verify(sites_dir: Path, labels: Path, *extra: str) -> int:
    return dxserve(["site", "verify", "--plugin", "lymphoblast", "--version", SITE_VERSION, "--labelled", str(labels),
                    "--sites-dir", str(sites_dir), *extra])


def test_verification_scores_a_site_version_on_other_patients_as_the_server_answers(onboarded, tmp_path, capsys):
    """`dxserve site verify`: every image answered through the site version as the server loads and
    runs it, and its parent beside it; the figures are those of the answers; kept in the site's
    folder and its card."""
    from sklearn.metrics import roc_auc_score

    from dxserve import registry, sites
    from dxserve.verification import CONFIDENT
    from dxserve_lymphoblast.plugin import LymphoblastRuntime, shipped_versions

    _, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    labels = write_other_patients(tmp_path / "other")
    assert verify(copy, labels, "--config", str(relaxed(tmp_path))) == 0
    printed = capsys.readouterr().out
    assert "it meets the site's acceptance criteria on these images" in printed
    folder = copy / "lymphoblast" / SITE_VERSION
    done = json.loads((folder / "verifications" / "1.json").read_text())
    report = json.loads((folder / "site.json").read_text())["report"]["acceptance"]
    assert done["report_acceptance"] == report and "its report (cross-validated on what it was fitted on): labelled 48," in printed
    rows = list(csv.DictReader(labels.open()))
    assert done["images"] == 48 and done["groups"] == 6 and [r["path"] for r in done["rows"]] == [r["path"] for r in rows]
    from dxserve.runtime import sha256_of

    assert [r["sha256"] for r in done["rows"]] == [sha256_of(labels.parent / r["path"]) for r in rows]
    site = json.loads((folder / "site.json").read_text())
    assert done["weights_sha256"] == site["weights"]["sha256"] and done["parent"] == site["parent"]
    images = [np.asarray(Image.open(labels.parent / r["path"]).convert("RGB")) for r in rows]
    y = np.array([r["label"] == "lymphoblast" for r in rows])
    versions, _ = sites.site_versions(copy, "lymphoblast", shipped_versions(), {})
    by_name = {v.version: v for v in versions} | {v.version: v for v in shipped_versions()}
    for name, key in ((SITE_VERSION, "site version"), (DEFAULT_VERSION, "parent")):
        runtime = registry.load_runtime(LymphoblastRuntime, by_name[name])
        prepared = [runtime.prepare(image) for image in images]
        prediction = runtime.predict_with_issues(np.stack([x for x, _ in prepared]))
        p = prediction.probabilities[:, 0]
        issues = [[q.code for q in gate] + [q.code for q in ood] for (_, gate), ood in zip(prepared, prediction.issues)]
        figures = done["figures"][key]
        expected_auroc = roc_auc_score(y, p) if np.ptp(p) > 0 else 0.5
        assert figures["acceptance"]["auroc"] == pytest.approx(expected_auroc, abs=1e-6)
        wrong = ((p >= CONFIDENT) & ~y) | ((p <= 1 - CONFIDENT) & y)
        assert figures["acceptance"]["confidently_wrong"] == pytest.approx(wrong.mean())
        assert figures["answered"] == pytest.approx(np.mean([not i and not runtime.decide(q).indeterminate
                                                             for i, q in zip(issues, prediction.probabilities)]))
        if key == "site version":
            assert [r["issues"] for r in done["rows"]] == issues
            assert [r["probabilities"]["lymphoblast"] for r in done["rows"]] == pytest.approx(p, abs=1e-6)
            assert [r["decision"] == "indeterminate" for r in done["rows"]] == [bool(i) or runtime.decide(q).indeterminate
                                                                               for i, q in zip(issues, prediction.probabilities)]
            for group in figures["per_group"]:  # what a user of each group was told: right, wrong, or nothing
                told = [(r["decision"], row["label"]) for r, row in zip(done["rows"], rows) if row["group"] == group["group"]]
                assert group["called_right"] == pytest.approx(np.mean([d == t for d, t in told]))
                assert group["called_wrong"] == pytest.approx(np.mean([d not in (t, "indeterminate") for d, t in told]))
    assert "## Verification 1: 48 labelled images of 6 groups" in (folder / "MODEL_CARD.md").read_text()


def test_verification_figures_are_the_usual_ones():
    """AUROC with ties as scikit-learn counts it; top-label ECE as the lymphoblast report computes it."""
    from sklearn.metrics import roc_auc_score

    from dxserve.verification import auroc, ece
    from dxserve_lymphoblast.calibration import expected_calibration_error

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1), 1)  # rounded: many ties
    assert auroc(y == 1, p) == pytest.approx(roc_auc_score(y, p))
    assert ece(np.stack([p, 1 - p], axis=1), 1 - y) == pytest.approx(expected_calibration_error(p, y))
    assert np.isnan(auroc(np.ones(5, bool), np.arange(5.0)))


def test_verification_refuses_images_or_patients_the_site_version_learnt_from(onboarded, tmp_path, capsys):
    root, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    labels = write_other_patients(tmp_path / "other", orientations=1)
    rows = labels.read_text().splitlines()
    for name in ("labelled", "unlabelled"):
        (tmp_path / "other" / name).symlink_to(root / name)
    fitted = {"labelled": "labelled/UID_11_10_1_all-3.png,lymphoblast,other-x",
              "unlabelled": "unlabelled/UID_11_10_1_all-1.jpg,lymphoblast,other-x",
              "same patient": rows[1].rsplit(",", 1)[0] + ",UID_11_10_1_all",
              "damaged image": "damaged.png,normal,other-y", "unknown label": rows[1].replace(",lymphoblast,", ",blast,")}
    (tmp_path / "other" / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for case, row in fitted.items():
        bad = tmp_path / "other" / f"{case}.csv"
        bad.write_text("\n".join([*rows, row]) + "\n")
        assert verify(copy, bad) == 2, case
        err = capsys.readouterr().err
        assert {"same patient": "groups UID_11_10_1_all also gave", "damaged image": "damaged.png: not a readable image",
                "unknown label": "label 'blast' is not one of lymphoblast, normal"}.get(
            case, "verify it on images it was never fitted on") in err, (case, err)
    assert dxserve(["site", "verify", "--version", DEFAULT_VERSION, "--labelled", str(labels), "--sites-dir", str(copy)]) == 2
    assert f"'{DEFAULT_VERSION}' is not a site version of lymphoblast" in capsys.readouterr().err
    folder = copy / "lymphoblast" / SITE_VERSION
    from dxserve_lymphoblast.plugin import LymphoblastRuntime

    def broken(self, batch):
        raise MemoryError("the plugin ran out of memory")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(LymphoblastRuntime, "predict_with_issues", broken)
        assert verify(copy, labels) == 2
    assert f"lymphoblast {SITE_VERSION} failed while answering the images: MemoryError" in capsys.readouterr().err
    with (folder / json.loads((folder / "site.json").read_text())["weights"]["file"]).open("ab") as f:
        f.write(b"\0")
    assert verify(copy, labels) == 2
    assert "refusing corrupt or altered weights" in capsys.readouterr().err
    assert not (folder / "verifications").exists()


def test_a_verification_the_disk_cannot_hold_leaves_nothing_behind(onboarded, tmp_path, capsys, monkeypatch):
    """A full disk while the verification is written: exit 2 saying so, and no verification file,
    whole or partial, that could later be read as the latest."""
    import errno

    _, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    labels = write_other_patients(tmp_path / "other", orientations=1)
    write_text = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.suffix == ".partial":
            write_text(self, data[:100], *args, **kwargs)  # the disk filled part-way through
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert verify(copy, labels) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list((copy / "lymphoblast" / SITE_VERSION / "verifications").iterdir()) == []


def test_a_site_version_is_served_only_while_its_latest_verification_meets_the_criteria(onboarded, tmp_path, capsys):
    """Required (`require_verification`): none, NOT_SERVED; one that misses a criterion (12 images
    where 40 are wanted; then each label's images from 2 patients where 3 are wanted): NOT_SERVED,
    required or not; a later one that meets them: served."""
    from dxserve import sites
    from dxserve.config import load_settings
    from dxserve_lymphoblast.plugin import shipped_versions

    _, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    required = tmp_path / "required.toml"
    required.write_text(relaxed(tmp_path).read_text() + "require_verification = true\n")

    def refused(config: Path) -> str:
        acceptance = load_settings(config).site_acceptance
        return sites.site_versions(copy, "lymphoblast", shipped_versions(), acceptance)[1].get(SITE_VERSION, "")

    assert "no verification on labelled images of other patients" in refused(required)
    assert refused(relaxed(tmp_path)) == ""
    assert dxserve(["site", "list", "--sites-dir", str(copy), "--config", str(required)]) == 0
    assert "\tnot verified\tNOT served: no verification" in capsys.readouterr().out
    assert verify(copy, write_other_patients(tmp_path / "few", orientations=2), "--config", str(required)) == 1
    assert "verification 1: labelled 12 (needs >= 40)" in refused(required)
    assert "verification 1: labelled 12 (needs >= 40)" in refused(relaxed(tmp_path))
    # Enough images, from too few patients: each label's 24 cells from 2 groups where 3 are wanted.
    two_patients = write_other_patients(tmp_path / "two")
    header, *rows = list(csv.reader(two_patients.open()))
    merged = {g: f"{label}-{i % 2}" for label in ("lymphoblast", "normal")
              for i, g in enumerate(sorted({r[2] for r in rows if r[1] == label}))}
    with two_patients.open("w", newline="") as f:
        csv.writer(f).writerows([header, *[[path, label, merged[group]] for path, label, group in rows]])
    assert verify(copy, two_patients, "--config", str(required)) == 1
    assert refused(required).endswith(": verification 2: groups_per_label 2 (needs >= 3)")  # that criterion alone
    capsys.readouterr()
    assert verify(copy, write_other_patients(tmp_path / "enough"), "--config", str(required), "--format", "json") == 0
    printed = capsys.readouterr()
    verified = json.loads(printed.out)  # the JSON alone on standard output; what was written and the verdict on stderr
    assert verified["number"] == 3 and verified["acceptance"]["labelled"] == 48 and "rows" not in verified
    assert verified["acceptance"]["groups_per_label"] == 3
    assert "verifications/3.json" in printed.err and "it meets the site's acceptance criteria" in printed.err
    assert refused(required) == "" and refused(relaxed(tmp_path)) == ""
    capsys.readouterr()
    assert dxserve(["site", "list", "--sites-dir", str(copy), "--config", str(required)]) == 0
    assert "\tverification 3: 48 images\tmeets its acceptance criteria" in capsys.readouterr().out
    third = copy / "lymphoblast" / SITE_VERSION / "verifications" / "3.json"
    written = json.loads(third.read_text())
    del written["acceptance"]["groups_per_label"]  # as one made before the figure was recorded: read from its rows
    third.write_text(json.dumps(written))
    assert refused(required) == ""
    assert sites.latest_verification(third.parent.parent)["acceptance"]["groups_per_label"] == 3
    third.write_text(json.dumps({**json.loads(third.read_text()), "weights_sha256": "0" * 64}))
    assert "verification 3: made on other weights (000000000000...)" in refused(relaxed(tmp_path))
    third.write_text("{")
    assert "verification 3: " in refused(relaxed(tmp_path)) and "unreadable" in refused(relaxed(tmp_path))


def test_a_server_refuses_and_will_not_promote_a_site_version_whose_verification_failed(onboarded, tmp_path, capsys):
    """Its report meets the (relaxed) criteria, its verification on other patients does not: listed
    NOT_SERVED with the verification's figure, refused FAILED_PRECONDITION, and promote fails."""
    _, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    config = relaxed(tmp_path)
    assert verify(copy, write_other_patients(tmp_path / "few", orientations=2), "--config", str(config)) == 1
    capsys.readouterr()
    keys = tmp_path / "callers.json"
    assert dxserve(["tokens", "add", "ops", "--admin", "--keys-file", str(keys)]) == 0
    admin_token = capsys.readouterr().out.strip()
    server = ServerProcess("--sites-dir", str(copy), "--config", str(config), "--auth-keys-file", str(keys), tmp=tmp_path,
                           env={"DXSERVE_DISABLED_PLUGINS": "smear_field"})
    try:
        wait_serving(server.address, [None, "lymphoblast"])
        with Client(server.address, token=admin_token) as client:
            listed = {v.version: v for v in next(p for p in client.list_plugins() if p.name == "lymphoblast").model_versions}
            assert listed[SITE_VERSION].state == pb.VERSION_STATE_NOT_SERVED
            assert "verification 1: labelled 12 (needs >= 40)" in listed[SITE_VERSION].state_reason
            assert "## Verification 1: 12 labelled images" in listed[SITE_VERSION].model_card
            with pytest.raises(DxServeError) as refused:
                client.classify(CELLS[0], model_version=SITE_VERSION)
            assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SITE_NOT_ACCEPTED")
        capsys.readouterr()
        assert dxserve(["site", "promote", "--server", server.address, "--plugin", "lymphoblast", "--version", SITE_VERSION,
                        "--token", admin_token]) == 1
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
        with Client(server.address, token=admin_token) as client:
            assert client.classify(CELLS[0]).model_version == DEFAULT_VERSION  # the default unchanged
    finally:
        assert server.stop() == 0


def test_a_verification_that_meets_the_criteria_says_when_the_report_still_holds_the_version_back(onboarded, tmp_path,
                                                                                                   capsys):
    """Met on other patients, short in its own report (the margin over colour alone, which only the
    report measures): exit 0, saying the version is still NOT served and why, as the server has it."""
    from dxserve import sites
    from dxserve.config import load_settings
    from dxserve_lymphoblast.plugin import shipped_versions

    _, sites_dir, _ = onboarded
    copy = tmp_path / "sites"
    shutil.copytree(sites_dir, copy)
    report = json.loads((copy / "lymphoblast" / SITE_VERSION / "site.json").read_text())["report"]
    margin = report["acceptance"]["margin_over_colour_alone"]
    assert margin < 1.0
    config = tmp_path / "margin.toml"
    config.write_text(relaxed(tmp_path).read_text().replace("min_margin_over_colour_alone = -1.0",
                                                            "min_margin_over_colour_alone = 1.0"))
    assert verify(copy, write_other_patients(tmp_path / "other"), "--config", str(config)) == 0
    why = f"margin_over_colour_alone {margin:.3g} (needs >= 1)"
    assert ("it meets the site's acceptance criteria on these images, but its report (cross-validated on what it was "
            f"fitted on) does not, so it is still NOT served: {why}") in capsys.readouterr().out
    refused = sites.site_versions(copy, "lymphoblast", shipped_versions(), load_settings(config).site_acceptance)[1]
    assert refused[SITE_VERSION].endswith(why)


def test_a_site_version_keeps_its_parent_when_the_parent_is_served_by_tensorflow(onboarded, monkeypatch):
    """Made while LiteRT served the parent; a GPU host that serves the same version's Keras file
    (DXSERVE_LYMPHOBLAST_RUNTIME=tensorflow) still knows it as that parent, and another file does not pass."""
    from dxserve import sites
    from dxserve_lymphoblast import plugin

    _, sites_dir, _ = onboarded
    monkeypatch.setenv(plugin.RUNTIME_ENV, "tensorflow")
    parents = plugin.shipped_versions()
    default = next(v for v in parents if v.version == DEFAULT_VERSION)
    assert default.weights.name == "model.keras" and default.same_model_sha256 == (default.extra["card"]["litert"]["sha256"],)
    _, refused = sites.site_versions(sites_dir, "lymphoblast", parents, {"lab": sites.SiteAcceptance(min_labelled=40, min_auroc=0.0,
        min_sensitivity_at_screen=0.0, max_ece=1.0, max_confidently_wrong=1.0, min_margin_over_colour_alone=-1.0)})
    assert SITE_VERSION not in refused
    other = [dataclasses.replace(v, same_model_sha256=()) if v.version == DEFAULT_VERSION else v for v in parents]
    _, refused = sites.site_versions(sites_dir, "lymphoblast", other, {})
    assert "onboard the site again" in refused[SITE_VERSION]


def test_a_caller_bound_to_its_site_version_gets_it_by_default(onboarded, tmp_path, capsys):
    """Issue 33: `dxserve tokens add NAME --version lymphoblast=<site version>` binds a caller (its
    lab's software) to the site version: its requests that name no version get it, and its audit
    rows name it; another caller gets the plugin's default; naming a version still wins."""
    import sqlite3

    _, sites_dir, _ = onboarded
    keys, tokens = tmp_path / "callers.json", {}
    for name, flags in (("lab-lis", ["--version", f"lymphoblast={SITE_VERSION}"]), ("other", [])):
        assert dxserve(["tokens", "add", name, "--keys-file", str(keys), *flags]) == 0
        tokens[name] = capsys.readouterr().out.strip()  # printed once
    assert dxserve(["tokens", "add", "bad", "--keys-file", str(keys), "--version", "lymphoblast"]) == 2
    assert "PLUGIN=VERSION" in capsys.readouterr().err
    assert dxserve(["tokens", "list", "--keys-file", str(keys)]) == 0
    assert f"lab-lis: token; plugins *; lymphoblast version {SITE_VERSION}" in capsys.readouterr().out
    server = ServerProcess("--sites-dir", str(sites_dir), "--config", str(relaxed(tmp_path)), "--auth-keys-file", str(keys),
                           tmp=tmp_path)
    try:
        wait_serving(server.address, [None, "lymphoblast"])
        image = as_another_lab(np.asarray(Image.open(CELLS[0]).convert("RGB")), 0)
        with Client(server.address, token=tokens["lab-lis"]) as lab, Client(server.address, token=tokens["other"]) as other:
            assert lab.classify(image).model_version == SITE_VERSION
            assert [r.model_version for r in lab.classify_stream([image, image])] == [SITE_VERSION] * 2
            assert lab.classify(image, model_version=DEFAULT_VERSION).model_version == DEFAULT_VERSION
            assert other.classify(image).model_version == DEFAULT_VERSION
        rows = sqlite3.connect(server.audit_path).execute("SELECT caller, model_version FROM audit WHERE caller != ''").fetchall()
        assert ("lab-lis", SITE_VERSION) in rows and ("other", DEFAULT_VERSION) in rows
    finally:
        assert server.stop() == 0


def test_a_candidate_in_shadow_is_counted_never_returned_then_promoted(onboarded, tmp_path, capsys):
    """Issue 33, item 5: the site version in shadow beside the default: every answer is the
    default's, the candidate's decision lands in the trail (per cell, with its specimen), the
    report gives agreement per cell and per specimen, and promote makes it the default, recorded."""
    import sqlite3

    _, sites_dir, _ = onboarded
    config = relaxed(tmp_path)
    config.write_text(config.read_text() + f'\n[shadow]\nlymphoblast = "{SITE_VERSION}"\n')
    keys = tmp_path / "callers.json"
    assert dxserve(["tokens", "add", "ops", "--admin", "--keys-file", str(keys)]) == 0
    admin_token = capsys.readouterr().out.strip()
    assert dxserve(["tokens", "add", "lab", "--keys-file", str(keys)]) == 0
    lab_token = capsys.readouterr().out.strip()
    server = ServerProcess("--sites-dir", str(sites_dir), "--config", str(config), "--auth-keys-file", str(keys), tmp=tmp_path)
    try:
        wait_serving(server.address, [None, "lymphoblast"])
        cells = [as_another_lab(np.asarray(Image.open(p).convert("RGB")), 0) for p in CELLS]
        with Client(server.address, token=lab_token) as lab:
            results = list(lab.classify_stream(cells, specimen_id="smear-1"))
            assert [r.model_version for r in results] == [DEFAULT_VERSION] * len(CELLS)  # only the served answer
            assert lab.classify(cells[0], model_version=SITE_VERSION).model_version == SITE_VERSION  # named: no shadow
        database = sqlite3.connect(server.audit_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and database.execute("SELECT COUNT(*) FROM audit WHERE event = 'shadow'").fetchone()[0] < len(CELLS):
            time.sleep(0.1)
        rows = database.execute("SELECT model_version, specimen_id, status, decision, detail FROM audit WHERE event = 'shadow'").fetchall()
        assert len(rows) == len(CELLS) and {r[:3] for r in rows} == {(SITE_VERSION, "smear-1", "OK")}
        served = {r.request_id + "/shadow": r.decision for r in results}
        for row in database.execute("SELECT request_id, decision, detail FROM audit WHERE event = 'shadow'"):
            detail = json.loads(row[2])
            assert detail["served_version"] == DEFAULT_VERSION and detail["served_decision"] == served[row[0]]
            assert detail["agree"] == (row[1] == served[row[0]])
        assert dxserve(["site", "shadow-report", "--db", str(server.audit_path), "--format", "json"]) == 0
        report = json.loads(capsys.readouterr().out)[f"lymphoblast {DEFAULT_VERSION} -> {SITE_VERSION}"]
        agreeing = sum(json.loads(r[4])["agree"] for r in rows)
        assert report["cells"] == len(CELLS) and report["agreement"] == pytest.approx(agreeing / len(CELLS))
        assert report["specimens"]["smear-1"] == {"cells": len(CELLS), "agreement": pytest.approx(agreeing / len(CELLS))}

        assert dxserve(["site", "promote", "--server", server.address, "--plugin", "lymphoblast", "--version", SITE_VERSION,
                        "--token", lab_token]) == 1  # not an admin
        assert dxserve(["site", "promote", "--server", server.address, "--plugin", "lymphoblast", "--version", SITE_VERSION,
                        "--token", admin_token]) == 0
        assert f"default {DEFAULT_VERSION} -> {SITE_VERSION}" in capsys.readouterr().out
        with Client(server.address, token=lab_token) as lab:
            assert lab.classify(cells[0]).model_version == SITE_VERSION
        promoted = database.execute("SELECT caller, model_version FROM audit WHERE event = 'default_version'").fetchall()
        assert promoted == [("ops", SITE_VERSION)]
    finally:
        assert server.stop() == 0


def test_a_field_site_version_finds_cells_at_the_labs_scale_behind_its_marks(tmp_path, capsys):
    """Issue 33, fields at a new lab: smear-field's `adapt` measures a lab's scale on its own
    fields (here BCCD's fields at 0.25x, whose red cells 1.0.0 cannot measure: SCALE_UNKNOWN),
    finds the mark burnt into each (a scale bar) and paints it over; its site version finds the
    cells 1.0.0 refuses, and is served only while the labelled fields in which it finds a cell
    meet the site's `min_fields_with_objects`."""
    from dxserve.sites import SiteAcceptance, unmet
    from dxserve_smear_field import detect
    from dxserve_smear_field.plugin import DETECTORS

    fields = sorted((FIXTURES / "fields").glob("*.jpg"))
    (tmp_path / "fields").mkdir()
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "group"])
        for path in fields:
            small = Image.open(path).convert("RGB").resize((160, 120), Image.Resampling.LANCZOS)
            for k, view in enumerate((small, small.transpose(0), small.transpose(1), small.rotate(180))):
                rgb = np.array(view)
                rgb[110:113, 120:150] = 20  # the scale bar, at the same place in every field
                name = f"fields/{path.stem}-{k}.png"
                Image.fromarray(rgb).save(tmp_path / name)
                out.writerow([name, "classified", path.stem])
    sites_dir = tmp_path / "sites"
    code = dxserve(["site", "onboard", "--plugin", "smear-field", "--base", "1.0.0", "--site", "lab", "--labelled",
                    str(tmp_path / "labels.csv"), "--unlabelled", str(tmp_path / "fields"), "--sites-dir", str(sites_dir)])
    printed = capsys.readouterr()
    assert code == 1, printed.out + printed.err  # written, but not to be served under the default criteria
    assert "labelled 12 (needs >= 50)" in printed.out + printed.err  # the default criteria: too few fields

    site = json.loads((sites_dir / "smear-field" / "1.0.0+lab.1" / "site.json").read_text())
    assert site["kind"] == "field" and site["parent"]["version"] == "1.0.0"
    measured = site["report"]["measured"]
    original = np.asarray(Image.open(fields[0]).convert("RGB"))
    bccd_px_per_um = detect.scale(original, detect.Parameters.load(DETECTORS / "1.0.0" / "parameters.json"))
    assert measured["microns_per_pixel"] == pytest.approx(1 / (bccd_px_per_um * 0.25), rel=0.25)
    (x0, y0, x1, y1), = measured["burnt_in_boxes"]
    assert x0 <= 120 / 160 and x1 >= 150 / 160 and y0 <= 110 / 120 and y1 >= 113 / 120 and (x1 - x0) * (y1 - y0) < 0.05
    assert site["report"]["parent"]["labelled_fields_with_a_cell"] == 0  # 1.0.0: SCALE_UNKNOWN everywhere
    assert site["report"]["parent"]["refusals"] == {"SCALE_UNKNOWN": 12}  # the 12 labelled, not again from the folder
    assert site["unlabelled"] == {}  # the folder held only the labelled fields
    assert site["report"]["acceptance"] == {"labelled": 12, "fields_with_objects": 1.0}
    assert unmet(site["report"], SiteAcceptance(min_labelled=10), "field") == []
    assert unmet(site["report"], SiteAcceptance(min_labelled=10, min_fields_with_objects=1.0), "field") == []
    assert unmet({"acceptance": {"labelled": 12, "fields_with_objects": 0.8}}, SiteAcceptance(min_labelled=10), "field") == [
        "fields_with_objects 0.8 (needs >= 0.95)"]

    config = tmp_path / "dxserve.toml"
    config.write_text("[site_acceptance.lab]\nmin_labelled = 10\n")
    assert dxserve(["site", "list", "--plugin", "smear-field", "--sites-dir", str(sites_dir), "--config", str(config)]) == 0
    assert "1.0.0+lab.1\t" in (listed := capsys.readouterr().out) and "meets its acceptance criteria" in listed
    # Verified on the same fields turned the four ways onboarding did not use, as other slides: found in each.
    (tmp_path / "other").mkdir()
    with (tmp_path / "other" / "labels.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "group"])
        for path in sorted((tmp_path / "fields").glob("*-0.png")):
            for turn in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE):
                name = f"{path.stem}-{turn.name}.png"
                Image.open(path).transpose(turn).save(tmp_path / "other" / name)
                out.writerow([name, "classified", f"other-{path.stem}"])
    assert dxserve(["site", "verify", "--plugin", "smear-field", "--version", "1.0.0+lab.1", "--labelled",
                    str(tmp_path / "other" / "labels.csv"), "--sites-dir", str(sites_dir), "--config", str(config)]) == 0
    verified = json.loads((sites_dir / "smear-field" / "1.0.0+lab.1" / "verifications" / "1.json").read_text())
    assert verified["acceptance"] == {"labelled": 12, "fields_with_objects": 1.0}
    assert verified["figures"]["parent"]["acceptance"]["fields_with_objects"] == 0.0  # 1.0.0 cannot measure the scale
    assert verified["figures"]["parent"]["issues"] == {"SCALE_UNKNOWN": 12}
    capsys.readouterr()
    server = ServerProcess("--sites-dir", str(sites_dir), "--config", str(config), tmp=tmp_path)
    try:
        wait_serving(server.address, [None, "smear-field"])
        field = (tmp_path / "fields" / f"{fields[0].stem}-0.png").read_bytes()
        with Client(server.address) as client:
            refused = client.classify(field, plugin="smear-field")
            assert refused.indeterminate and refused.field.found == 0 and "SCALE_UNKNOWN" in refused.reason
            found = client.classify(field, plugin="smear-field", model_version="1.0.0+lab.1")
            assert found.model_version == "1.0.0+lab.1" and found.field.found >= 1
            assert all(o.result.plugin == "lymphoblast" for o in found.objects)
    finally:
        assert server.stop() == 0
