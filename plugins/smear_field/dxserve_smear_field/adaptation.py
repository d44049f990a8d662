"""A site version of the detector (issue 33): the detector's parameters fitted to one lab's fields.

`adapt` (SmearFieldRuntime.adapt, through `dxserve site onboard --plugin smear-field`) measures
from the lab's own fields, unlabelled, what 1.0.0 assumes from BCCD's:

1. **The scale.** Red cells measured at any magnification (the distance transform's window and
   smallest radius follow a first estimate instead of BCCD's pixels), field by field; the
   median over the site's fields is its microns per pixel, used when a request gives none.
2. **Burnt-in marks.** A scale bar or a label at the same place in every field: pixels darker
   than the plasma in at least `OVERLAY_SHARE` of the fields of one size, where cells come and
   go. Their box is painted over with the field's plasma before detection (`mask_boxes`).
3. **Nuclei apart from red cells by hue.** Where the site's red cells stain blue-grey inside the
   nucleus hue range (1.0.0's violet, 0.55-0.9, is wide enough for BCCD's pink red cells to lie
   outside it), the hues of its stained pixels have two modes; the range then starts at the
   valley between them (`nucleus_hue`), so red cells are not taken for nuclei.
4. **The field gate on the site's colours.** `min_smear_hue_fraction` is lowered (never raised)
   to the site's 2nd percentile, so the site's own stain is not "not a smear", while a photo or
   noise still is.
5. **A site's profile**: clumps and edge cells left out (kept cells classified) and a field's own
   nucleus threshold, floored at 0.2, where the fixed one finds nothing.

The labelled CSV lists fields that show at least one white cell (label `classified`); the report
gives the share of them in which a cell is found (`fields_with_objects`, the acceptance
criterion `min_fields_with_objects`), and for every field, labelled or not, the refusal codes.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dxserve.runtime import Adaptation, LabelledImage

from . import detect

OVERLAY_SHARE = 0.9  # of a size's fields: a mark there in at least this share is burnt in
MIN_FIELDS_FOR_OVERLAY = 10
PROFILE = {"skip_clumps": True, "drop_border_cells": True, "nucleus_min_saturation_floor": 0.2}
WEIGHTS = "parameters.json"


def red_cell_px(rgb: np.ndarray, p: detect.Parameters) -> float:
    """The field's red-cell diameter in pixels at any magnification, 0 when it cannot tell: a first
    estimate with a small window, then again with the window and smallest radius it implies."""
    diameter = 0.0
    for _ in range(2):
        radius = diameter / 2 if diameter else 3.0
        probe = dataclasses.replace(p, rbc_peak_window_px=max(3, int(radius * 3) | 1),
                                    rbc_min_radius_px=max(1.5, radius * 0.6 if diameter else 1.5))
        found = detect.scale(rgb, probe)  # px per um of a 7.5 um cell
        if found <= 0:
            return 0.0
        diameter = found * p.rbc_diameter_um
    return diameter


def burnt_in_boxes(fields: Sequence[np.ndarray]) -> list[list[float]]:
    """Boxes (fractions of the field: x0, y0, x1, y1) of marks at the same place in nearly every
    field of the most common size: a scale bar, a label."""
    sizes = Counter(f.shape[:2] for f in fields)
    (height, width), count = sizes.most_common(1)[0]
    if count < MIN_FIELDS_FOR_OVERLAY:
        return []
    dark = np.zeros((height, width), np.float32)
    for field in (f for f in fields if f.shape[:2] == (height, width)):
        grey = field.mean(axis=2)
        dark += grey < np.percentile(grey, 90) * 0.6  # well below the plasma: stain, or a mark
    mark = (dark / count >= OVERLAY_SHARE).astype(np.uint8)
    mark = cv2.dilate(mark, np.ones((5, 5), np.uint8))
    boxes = []
    number, labels, stats, _ = cv2.connectedComponentsWithStats(mark)
    for label in range(1, number):
        x, y, w, h, _ = stats[label]
        boxes.append([round(x / width, 4), round(y / height, 4), round((x + w) / width, 4), round((y + h) / height, 4)])
    return boxes


def nucleus_hue_floor(fields: Sequence[np.ndarray], p: detect.Parameters, bins: int = 48) -> float:
    """The lower end of the nucleus hue range for the site: the valley between the highest mode of
    its stained pixels' hues within the parent's range and the highest other mode set apart from
    it by a valley under half that mode's height; else the parent's."""
    low, high = p.nucleus_hue
    counts = np.zeros(bins)
    for field in fields:
        hue, saturation = detect._hsv(field)
        counts += np.histogram(hue[saturation > 0.2], bins=bins, range=(low, high))[0]
    smooth = np.convolve(counts, [1, 2, 1], mode="same")
    peaks = [i for i in range(1, bins - 1) if smooth[i] >= smooth[i - 1] and smooth[i] > smooth[i + 1]
             and smooth[i] > 0.2 * smooth.max()]
    top = max(peaks, key=lambda i: smooth[i], default=None)
    best = None  # the highest other mode with a valley under half its height between it and the top one
    for other in peaks:
        a, b = sorted((top, other))
        valley = a + int(np.argmin(smooth[a:b + 1]))
        if other != top and smooth[valley] < 0.5 * smooth[other] and (best is None or smooth[other] > smooth[best[0]]):
            best = other, valley
    if best is None:
        return low
    return float(low + (best[1] + 0.5) * (high - low) / bins)  # the upper mode, the more violet, is the nuclei


def fit(parent: detect.Parameters, fields: Sequence[np.ndarray]) -> tuple[detect.Parameters, dict]:
    """The site's parameters from its fields, and what was measured to set them."""
    boxes = burnt_in_boxes(fields)
    masked = [detect.mask_boxes(f, boxes) for f in fields]
    diameters = np.array([red_cell_px(f, parent) for f in masked])
    measured = diameters[diameters > 0]
    if measured.size == 0:
        raise ValueError("no field has enough red cells to measure the site's scale")
    microns_per_pixel = parent.rbc_diameter_um / float(np.median(measured))
    hue = (round(nucleus_hue_floor(masked, parent), 4), parent.nucleus_hue[1])
    # The gate's share of smear hues counts violet from the site's nucleus hue on: fitted with it.
    shares = np.array([detect.smear_hue_share(f, parent.with_overrides({"nucleus_hue": hue})) for f in masked])
    min_share = min(parent.min_smear_hue_fraction, float(np.percentile(shares, 2)))
    site = parent.with_overrides({**PROFILE, "mask_boxes": boxes, "nucleus_hue": hue,
                                  "site_microns_per_pixel": round(microns_per_pixel, 4),
                                  "min_smear_hue_fraction": round(min_share, 3)})
    return site, {
        "microns_per_pixel": microns_per_pixel, "fields_with_a_scale": int(measured.size),
        "red_cell_px": {"median": float(np.median(measured)), "p10": float(np.percentile(measured, 10)),
                        "p90": float(np.percentile(measured, 90))},
        "burnt_in_boxes": boxes, "nucleus_hue": {"parent": list(parent.nucleus_hue), "site": list(site.nucleus_hue)},
        "min_smear_hue_fraction": {"parent": parent.min_smear_hue_fraction, "site": min_share}}


def outcome(rgb: np.ndarray, p: detect.Parameters) -> tuple[int, str]:
    cells, issues = detect.find(rgb, p)
    return len(cells), (issues[0].code if issues else "")


def adapt(parent: detect.Parameters, labelled: Sequence[LabelledImage], unlabelled: Sequence[np.ndarray],
          folder: Path) -> Adaptation:
    site, measured = fit(parent, [*unlabelled, *(x.image for x in labelled)])
    (folder / WEIGHTS).write_text(json.dumps(dataclasses.asdict(site), indent=2) + "\n")
    report: dict = {"measured": measured}
    for name, params in (("parent", parent), ("site", site)):
        seen = [outcome(x.image, params) for x in labelled]
        everything = seen + [outcome(f, params) for f in unlabelled]
        report[name] = {
            "labelled_fields_with_a_cell": sum(n > 0 for n, _ in seen) / len(seen) if seen else None,
            "all_fields_with_a_cell": sum(n > 0 for n, _ in everything) / len(everything),
            "cells_per_field": float(np.mean([n for n, _ in everything])),
            "refusals": dict(Counter(code for _, code in everything if code))}
    report["acceptance"] = {"labelled": len(labelled), "fields_with_objects": report["site"]["labelled_fields_with_a_cell"]}
    card = {"intended_use": "this laboratory's smear fields; cells found are classified by the caller's lymphoblast version"}
    return Adaptation(WEIGHTS, report, card)
