"""The smear-field plugin: finding white cells in BCCD fields (the fixtures, with their boxes),
its field gate, the scale, and fields over the wire, each found cell answered by lymphoblast."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DEFAULT_VERSION, FIXTURES

from dxserve_smear_field import detect, evaluate
from dxserve_smear_field.plugin import SmearFieldRuntime

FIELDS = sorted((FIXTURES / "fields").glob("*.jpg"))


@pytest.fixture(scope="module")
def runtime() -> SmearFieldRuntime:
    runtime = SmearFieldRuntime(SmearFieldRuntime.versions()[0])
    runtime.load()
    return runtime


def rgb_of(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_each_annotated_white_cell_is_found(runtime):
    for path in FIELDS:
        found, issues = runtime.find_objects(rgb_of(path))
        assert not issues, (path.name, issues)
        boxes = [(o.box[0], o.box[1], o.box[0] + o.box[2], o.box[1] + o.box[3]) for o in found]
        truth = evaluate.white_cells(path.with_suffix(".xml"))
        tp, fp, fn, ious = evaluate.match(boxes, truth)
        assert (tp, fp, fn) == (len(truth), 0, 0) and min(ious) >= 0.5, path.name
        for o in found:  # what lymphoblast expects: the cell on black, centred on its 450 px canvas
            assert o.image.shape == (450, 450, 3) and o.image[0, 0].sum() == 0 and o.image[225, 225].sum() > 0
            assert o.mask.shape == (o.box[3], o.box[2]) and o.mask.mean() > 0.3


def test_the_gate_refuses_what_is_not_a_field(runtime):
    expected = {"blank": "NO_CELLS", "noise": "NOT_A_SMEAR", "photo-like (sky over grass)": "NOT_A_SMEAR",
                "the field defocused (Gaussian blur, sigma 6 px)": "OUT_OF_FOCUS"}
    field = rgb_of(FIXTURES / "fields" / "BloodImage_00007.jpg")
    rng = np.random.default_rng(1)
    images = {"blank": np.full((480, 640, 3), 235, np.uint8), "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
              "photo-like (sky over grass)": np.concatenate([np.full((240, 640, 3), (90, 150, 230), np.uint8),
                                                             np.full((240, 640, 3), (60, 160, 50), np.uint8)]),
              "the field defocused (Gaussian blur, sigma 6 px)": cv2.GaussianBlur(field, (0, 0), 6)}
    for name, rgb in images.items():
        found, issues = runtime.find_objects(rgb)
        assert found == [] and [i.code for i in issues] == [expected[name]], name


def test_the_scale_comes_from_the_red_cells_or_the_request(runtime):
    field = rgb_of(FIELDS[0])
    estimated = detect.scale(field, runtime.parameters)
    assert 10 < estimated < 20  # BCCD's red cells are about 109 px across: 14.5 px per um
    assert detect.scale(field, runtime.parameters, microns_per_pixel=0.1) == pytest.approx(10.0)
    # A cell is brought to the classifier's scale: the same box at twice the pixels per um
    # covers a quarter of the canvas area.
    (cell,), _ = runtime.find_objects(field)
    x, y, w, h = cell.box
    box = field[y:y + h, x:x + w]
    native = detect._on_canvas(box, cell.mask, runtime.parameters, estimated)
    finer = detect._on_canvas(box, cell.mask, runtime.parameters, 2 * estimated)
    ratio = (finer.sum(axis=2) > 0).sum() / (native.sum(axis=2) > 0).sum()
    assert ratio == pytest.approx(0.25, abs=0.03)


def test_fields_over_the_wire_never_give_a_confident_call_off_site(client):
    """BCCD's cells are unlike C-NMC's (another stain, another lab): each comes back from
    lymphoblast indeterminate through its gate or out-of-distribution check, never a call."""
    for path in FIELDS:
        result = client.classify(path.read_bytes(), plugin="smear-field")
        assert result.field.found >= 1 and result.field.objects_plugin == "lymphoblast"
        assert result.field.classified == 0 and result.field.indeterminate == result.field.found
        assert result.indeterminate and f"{result.field.found} found: 0 classified" in result.reason
        for found in result.objects:
            assert found.result.ok and found.result.indeterminate and not found.result.quality_passed
            assert found.result.plugin == "lymphoblast" and len(found.result.weights_sha256) == 64


def test_the_cli_prints_a_row_per_cell_and_draws_the_boxes(server, capsys, tmp_path):
    from dxserve_client.cli import main

    code = main(["--server", server.address, "classify", str(FIXTURES / "fields"), "--plugin", "smear-field", "--quiet",
                 "--format", "csv", "--overlay", str(tmp_path), "--specimen-id", "smear-1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = out.out.strip().splitlines()[1:]
    assert len(rows) == 3 and all(",0," in row for row in rows)  # object 0 of each field, with its box
    assert f"specimen smear-1 (lymphoblast {DEFAULT_VERSION}): 3 cells" in out.err
    drawn = sorted(tmp_path.glob("run-*/*.objects.png"))
    assert len(drawn) == 3 and cv2.imread(str(drawn[0])).shape == (480, 640, 3)


def test_a_field_that_is_one_red_mask_is_a_clean_refusal(runtime):
    """Issue 33: a red-cell mask covering the whole field measured a red cell 1e38 px wide, and
    the kernel built from it raised inside OpenCV (INTERNAL). Now: no scale, a coded refusal."""
    pink = np.full((300, 300, 3), (230, 120, 170), np.uint8)
    pink[140:160, 140:160] = (90, 40, 160)  # a violet speck, so the field gate passes
    assert detect.scale(pink, runtime.parameters) == 0.0
    found, issues = runtime.find_objects(pink)
    assert found == [] and [i.code for i in issues] in (["SCALE_UNKNOWN"], ["NOT_A_SMEAR"], ["NO_CELLS"])


def test_a_site_profile_keeps_the_cells_beside_a_clump():
    """Site overrides (`Parameters.with_overrides`): a clump is left out instead of refusing the
    field, cells cut by the field's edge are left out; an unknown name is refused."""
    p = detect.Parameters.load(SmearFieldRuntime.versions()[0].weights)
    field = np.full((400, 400, 3), 235, np.uint8)
    cv2.circle(field, (100, 100), 12, (90, 40, 160), -1)  # a white cell's nucleus, about 5 um across
    cv2.rectangle(field, (200, 150), (390, 390), (90, 40, 160), -1)  # a violet mass far over 30 um: a clump
    cv2.circle(field, (0, 300), 12, (90, 40, 160), -1)  # a nucleus cut by the left edge
    um_per_px = 0.2
    assert [i.code for i in detect.cells(field, p, 1 / um_per_px)[1]] == ["CLUMP"]
    site = p.with_overrides({"skip_clumps": True, "drop_border_cells": True})
    found, issues = detect.cells(field, site, 1 / um_per_px)
    assert issues == [] and len(found) == 1
    x, y, w, h = found[0].box
    assert abs(x + w / 2 - 100) < 3 and abs(y + h / 2 - 100) < 3
    with pytest.raises(ValueError, match="unknown detector parameters: nucleus_colour"):
        p.with_overrides({"nucleus_colour": 1})


def test_a_site_with_paler_nuclei_has_them_found_by_the_fields_own_threshold():
    """`nucleus_min_saturation_floor`: a field whose nuclei stain paler than the fixed threshold
    takes (Aria's Pro-B fields) is searched again with its own (Otsu) threshold; at 0, the shipped
    detector's behaviour is unchanged."""
    p = detect.Parameters.load(SmearFieldRuntime.versions()[0].weights).with_overrides(
        {"min_stained_fraction": 0.0, "min_focus": 0.0})  # a bare synthetic field: only the nucleus matters here
    field = np.full((400, 400, 3), 235, np.uint8)
    hsv = np.uint8([[[int(0.75 * 180), int(0.3 * 255), 200]]])  # violet at saturation 0.3 (the fixed threshold: 0.4)
    pale = tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    cv2.circle(field, (150, 200), 12, pale, -1)
    assert detect.find(field, p, 0.2) == ([], [])
    found, issues = detect.find(field, p.with_overrides({"nucleus_min_saturation_floor": 0.2}), 0.2)
    assert issues == [] and len(found) == 1 and abs(found[0].box[0] + found[0].box[2] / 2 - 150) < 3


@pytest.mark.parametrize("candidates", [detect.PEAK_CANDIDATES, 0])  # checked against the disk, or dilated by it
def test_red_cell_peaks_are_the_disks_local_maxima_exactly(monkeypatch, candidates):
    """The red-cell scale's peaks: the pixels equal to their grey dilation by the window's disk
    (scipy's, beyond the field nothing), found through the inscribed square's dilation and a check
    of each candidate against its disk (issue 32: 1.35 to 0.22 s on a 25 Mpx smear, the same peaks
    on 121 fields), or, past PEAK_CANDIDATES, by dilating with the disk as before."""
    from scipy import ndimage

    monkeypatch.setattr(detect, "PEAK_CANDIDATES", candidates)
    rng = np.random.default_rng(0)
    red = np.zeros((detect.BAND + 300, 900), np.uint8)  # two bands of rows
    for y, x, r in zip(rng.integers(0, red.shape[0], 200), rng.integers(0, 900, 200), rng.integers(8, 30, 200), strict=True):
        cv2.circle(red, (int(x), int(y)), int(r), 1, -1)  # red cells, some cut by the edges, some touching
    distance = cv2.distanceTransform(red, cv2.DIST_L2, 5)
    for window, floor in ((51, 15.0), (21, 3.0), (9, 0.0)):
        kernel = detect._disk(window).astype(bool)
        dilated = ndimage.grey_dilation(distance, footprint=kernel, mode="constant", cval=-np.inf)
        expected = distance[(distance == dilated) & (distance > floor)]
        assert expected.size > 10 and np.array_equal(detect._peaks(distance, window, floor), expected)


def test_a_cells_body_is_dilated_by_rows_exactly_as_opencv_would():
    """A cell's body (a filled convex hull) widened by its cytoplasm disk, row by row (issue 32:
    4.5 ms a cell for an 81 px disk): the same pixels as cv2.dilate for hulls anywhere in their box,
    cut by its edges or not; a mask that is not one run a row, or whose rows' runs do not touch,
    is handed to cv2.dilate."""
    rng = np.random.default_rng(1)
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(20, 260, 2))
        points = np.stack([rng.integers(-10, width + 10, 6), rng.integers(-10, height + 10, 6)], axis=1).astype(np.int32)
        body = cv2.fillConvexPoly(np.zeros((height, width), np.uint8), cv2.convexHull(points), 1)
        kernel = detect._disk(float(rng.choice([1, 3, 9, 41, 81])))
        assert np.array_equal(detect._dilated_rows(body, kernel), cv2.dilate(body, kernel) > 0), trial
    two_runs = np.zeros((40, 40), np.uint8)
    two_runs[10:20, 5:10] = two_runs[10:20, 20:25] = 1
    assert np.array_equal(detect._dilated_rows(two_runs, detect._disk(9)), cv2.dilate(two_runs, detect._disk(9)) > 0)
    apart = np.zeros((40, 40), np.uint8)  # one run a row, but the runs of two rows do not touch
    apart[10, 2:5] = apart[11, 20:25] = 1
    assert np.array_equal(detect._dilated_rows(apart, detect._disk(3)), cv2.dilate(apart, detect._disk(3)) > 0)
    assert not detect._dilated_rows(np.zeros((9, 9), np.uint8), detect._disk(5)).any()


@pytest.mark.parametrize(("specks", "whole"), [(15, False), (4000, True)])  # around each component, or the whole mask
def test_nucleus_lobes_are_merged_where_they_are_exactly(monkeypatch, specks, whole):
    """The lobe-merging dilation of a field's nuclei, made only around its groups of components
    (issue 32: a 15 Mpx field's 0.25 s), equals cv2.dilate of the whole mask, at the field's edges
    too; a mask whose groups would cover half the field is dilated whole."""
    rng = np.random.default_rng(2)
    mask = np.zeros((700, 900), np.uint8)
    for y, x, r in zip(rng.integers(-5, 705, specks), rng.integers(-5, 905, specks), rng.integers(1, 12, specks), strict=True):
        cv2.circle(mask, (int(x), int(y)), int(r), 1, -1)
    original, shapes = cv2.dilate, []
    monkeypatch.setattr(cv2, "dilate", lambda m, k: shapes.append(m.shape) or original(m, k))
    kernel = detect._disk(45)
    assert np.array_equal(detect._sparse_dilate(mask, kernel), original(mask, kernel))
    assert (mask.shape in shapes) == whole and (len(shapes) == 1 if whole else 1 < len(shapes) <= specks)


def test_focus_is_the_variance_of_the_laplacian():
    """The field gate's focus, from an int16 Laplacian pooled over bands of rows, is numpy's
    variance of OpenCV's 64-bit Laplacian of the whole field."""
    rng = np.random.default_rng(3)
    for rows in (300, detect.BAND * 2 + 77):
        grey = cv2.GaussianBlur(rng.integers(0, 256, (rows, 500), dtype=np.uint8), (5, 5), 1.0)
        grey[rng.random(grey.shape) < 0.01] = 255  # sharp specks: large Laplacians of both signs
        expected = cv2.Laplacian(grey, cv2.CV_64F).var()
        assert detect._laplacian_variance(grey) == pytest.approx(expected, rel=1e-10)


def test_a_large_field_with_its_scale_given_is_searched_coarsely_and_finds_the_same_cells(monkeypatch):
    """Detector 1.1.0 searches a field over 2 Mpx whose scale is given on every k-th pixel, then
    takes each nucleus again from the field itself: the fixtures tiled 3 x 3 (1920 x 1440 px) with
    BCCD's scale are searched at step 2 and give 1.0.0's cells (every box within IoU 0.9, the same
    count); without a scale (measured from the red cells), 1.1.0 is 1.0.0 to the bit."""
    from dxserve_smear_field.plugin import version_folder

    old, new = (detect.Parameters.load(version_folder(v) / "parameters.json") for v in ("1.0.0", "1.1.0"))
    assert SmearFieldRuntime.versions()[0].version == "1.1.0"  # the default
    tiles = [rgb_of(path) for path in FIELDS]
    field = np.vstack([np.hstack([tiles[(r + c) % len(tiles)] for c in range(3)]) for r in range(3)])
    scale = evaluate.BCCD_MICRONS_PER_PIXEL
    assert (detect.coarse_step(field, new, scale), detect.coarse_step(field, new, 0.0), detect.coarse_step(field, old, scale)) == (2, 1, 1)
    searched, original = [], detect._nuclei
    monkeypatch.setattr(detect, "_nuclei", lambda rgb, *rest: searched.append(rgb.shape[:2]) or original(rgb, *rest))
    before, _ = detect.find(field, old, scale)
    after, _ = detect.find(field, new, scale)
    assert searched == [(1440, 1920), (720, 960)]
    assert len(after) == len(before) >= 9
    for box in evaluate.corners(before):
        assert max(evaluate.iou(box, other) for other in evaluate.corners(after)) >= 0.9
    measured_old, _ = detect.find(field, old)
    measured_new, _ = detect.find(field, new)
    assert [c.box for c in measured_new] == [c.box for c in measured_old]
    assert all(np.array_equal(a.crop, b.crop) for a, b in zip(measured_new, measured_old, strict=True))
