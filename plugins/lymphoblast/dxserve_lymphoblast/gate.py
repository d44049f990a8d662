"""The input quality gate: is this image one well-imaged, segmented cell like the training cells?

`measure` computes a few cheap statistics of a decoded image; `check` compares them with
accepted ranges that `fit` derives from the developer set (a high percentile of each, with a
margin) and that ship in the model card. An image outside any range is answered
indeterminate with the reasons, whatever the model would say: a diagnostic model must not
give a confident label to a blank frame, noise, a tile of cells or another lab's
unsegmented crop.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dxserve.runtime import QualityIssue

from .preprocess import foreground_mask

# Statistic -> (reason code, what it measures, which side fails: "low", "high" or "both",
# the least slack beyond the developer set's extreme, in the statistic's units).
CHECKS = {
    "cell_fraction": ("NO_CELL", "share of the image that is cell (non-black)", "low", 0.0),
    "background_fraction": ("NOT_SEGMENTED", "share of the image that is black background", "low", 0.0),
    "saturated_fraction": ("SATURATED", "share of the cell's pixels at full brightness", "high", 0.02),
    "other_objects_fraction": ("MULTIPLE_CELLS", "share of the foreground outside the largest object", "high", 0.05),
    "border_fraction": ("CUT_BY_BORDER", "share of the image border covered by the cell", "high", 0.02),
    "noise": ("NOISE", "median brightness step between neighbouring cell pixels", "high", 3.0),
    "sharpness": ("OUT_OF_FOCUS", "mean absolute Laplacian in the cell's core (over 12 px from its edge)", "low", 0.0),
    "log_diameter": ("SIZE_OUT_OF_RANGE", "log of the cell's equivalent diameter in pixels", "both", 0.0),
    "colour_distance": ("COLOUR_OUT_OF_RANGE", "Mahalanobis distance of the cell's mean colour to the training cells'", "high", 0.0),
}
# Accepted ranges: the developer set's 0.1th / 99.9th percentiles, widened by this share of
# its 1st-99th percentile spread (or the check's least slack, whichever is more).
PERCENTILE = 0.1
MARGIN = 0.25
# Pixels deeper than this inside the cell are where its focus is measured.
CORE_DEPTH = 12


def measure(rgb: np.ndarray, colour_stats: dict | None = None, mask: np.ndarray | None = None) -> dict[str, float]:
    """The gate's statistics of a decoded uint8 RGB image (colour_distance needs `colour_stats`;
    `mask`: its `foreground_mask`, when the caller has it already)."""
    stats, mean_colour = _measure(rgb, mask)
    distance = colour_distance(mean_colour, colour_stats) if colour_stats and mean_colour is not None else 0.0
    return {**stats, "colour_distance": distance}


def _measure(rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    """Every statistic but the colour distance, and the cell's mean RGB (None without a cell)."""
    mask = foreground_mask(rgb) if mask is None else mask
    area = int(np.count_nonzero(mask))
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    stats = {
        "cell_fraction": area / mask.size,
        "background_fraction": 1.0 - area / mask.size,
        "border_fraction": float(border.mean()),
        "log_diameter": float(np.log(max(np.sqrt(area), 1.0))),
    }
    if area < 16:
        return {**stats, "saturated_fraction": 0.0, "other_objects_fraction": 0.0, "noise": 0.0, "sharpness": 0.0}, None
    # The rest works on the foreground's bounding box (about a fifth of a C-NMC image), 4 px wider.
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(max(rows[0] - 4, 0), rows[-1] + 5), slice(max(cols[0] - 4, 0), cols[-1] + 5))
    mask = mask[box]
    cv2 = _cv2()
    pixels = np.ascontiguousarray(rgb[box])
    r, g, b = cv2.split(pixels)  # uint8 channel planes
    total = r.astype(np.uint16)
    total += g
    total += b
    grey = total.astype(np.float32) / 3.0  # equal to (r + g + b) / 3 in float32: the sum is exact
    inner = eroded(mask, 3)  # away from the cell's edge
    if not inner.any():
        inner = mask
    step = np.abs(np.diff(grey, axis=1))[inner[:, 1:] & inner[:, :-1]]
    # Focus is read in the cell's core only: a blurred edge spreads the mask outwards, and within a
    # few pixels of it the edge's own Laplacian made a 1 px blur look *sharper*.
    core = deeper_than(mask, CORE_DEPTH)
    laplacian = focus(grey, core if core.any() else inner)
    bright = cv2.min(cv2.min(r, g), b) >= 250
    stats.update(
        saturated_fraction=np.count_nonzero(bright & mask) / area,
        other_objects_fraction=float(1.0 - largest_object(mask) / area),
        noise=float(np.median(step)) if step.size else 0.0,
        sharpness=float(laplacian.mean()),
    )
    # The cell's mean colour: exact integer sums over its pixels (OpenCV adds them in float64, which
    # holds them exactly), divided as numpy's mean divides; cv2.mean's own division differed by an ulp.
    sums = cv2.sumElems(cv2.bitwise_and(pixels, pixels, mask=mask.view(np.uint8)))
    return stats, np.array(sums[:3], np.float64) / area


def _cv2():
    """OpenCV, single-threaded: the server already prepares several images at once in its own
    threads, and OpenCV's pool splitting each small call only burnt CPU (+30 % per image measured)."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


#: How far `focus`'s filters reach: the Gaussian's radius (scipy's truncation, int(4.0 * sigma + 0.5)) plus the Laplacian's.
FOCUS_REACH = 4 + 1
#: The Gaussian (sigma 1) as scipy.ndimage.gaussian_filter makes it: truncated at 4 sigma, normalised.
_GAUSSIAN = np.exp(-0.5 * np.arange(-4, 5, dtype=np.float64) ** 2)
_GAUSSIAN /= _GAUSSIAN.sum()


def focus(grey: np.ndarray, where: np.ndarray) -> np.ndarray:
    """|Laplacian of the Gaussian (sigma 1)| of float32 `grey` at the pixels of `where`:
    `abs(ndimage.laplace(ndimage.gaussian_filter(grey, 1.0)))[where]` (same kernels, same
    mirrored border), through OpenCV's separable filter, about 4x faster; equal to 1e-6 of
    the value (float32 sums in another order). Filtered over `where`'s bounding box widened by
    the filters' reach only: each value needs no pixel beyond it."""
    cv2 = _cv2()
    rows, cols = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
    top, left = max(rows[0] - FOCUS_REACH, 0), max(cols[0] - FOCUS_REACH, 0)
    window = (slice(top, rows[-1] + 1 + FOCUS_REACH), slice(left, cols[-1] + 1 + FOCUS_REACH))
    smooth = cv2.sepFilter2D(grey[window], cv2.CV_32F, _GAUSSIAN, _GAUSSIAN, borderType=cv2.BORDER_REFLECT)
    return np.abs(cv2.Laplacian(smooth, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT))[where[window]]


def largest_object(mask: np.ndarray) -> int:
    """Pixels of `mask`'s largest 4-connected object (`ndimage.label`'s default), through OpenCV's
    labelling: a mask of one object (nearly every cell) is that object; with more, the labels'
    counts. Half the CPU of OpenCV's labelling with statistics (0.16 against 0.35 ms a cell)."""
    cv2 = _cv2()
    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if count <= 2:  # the background and at most one object
        return int(np.count_nonzero(mask)) if count == 2 else 0
    return int(np.bincount(labels.ravel(), minlength=count)[1:].max())


def eroded(mask: np.ndarray, iterations: int) -> np.ndarray:
    """`ndimage.binary_erosion(mask, iterations=...)` (3x3 cross, outside the array counts as
    background), exactly, through OpenCV's erosion, several times faster."""
    cv2 = _cv2()
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    out = cv2.erode(mask.view(np.uint8), cross, iterations=iterations, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out.view(bool)


def deeper_than(mask: np.ndarray, depth: int) -> np.ndarray:
    """Pixels whose Euclidean distance to the nearest background pixel of `mask` exceeds `depth`:
    `ndimage.distance_transform_edt(mask) > depth`, exactly, without a distance transform.

    A pixel is that deep exactly when no background pixel lies within `depth` of it, i.e. when
    it survives erosion by the digital disk {(dy, dx): dy^2 + dx^2 <= depth^2}. That disk is the
    union of the rectangles |dy| <= h, |dx| <= isqrt(depth^2 - h^2), and erosion by a union is
    the intersection of the erosions, so a few rectangular erosions (separable in OpenCV) give
    it: about 3x cheaper than the exact transform, 0.3 ms for a C-NMC cell. Outside the array
    counts as foreground, as in scipy, where only background inside the array counts; a mask
    with no background at all gets scipy's answer for it, the distance to a point just above
    the top-left corner ((y + 1)^2 + x^2, compared as integers)."""
    cv2 = _cv2()
    if mask.all():
        rows, cols = np.ogrid[1:mask.shape[0] + 1, 0:mask.shape[1]]
        return rows * rows + cols * cols > depth * depth
    source, out = mask.view(np.uint8), None
    for height, width in _disk_rectangles(depth):
        kernel = np.ones((2 * height + 1, 2 * width + 1), np.uint8)
        survived = cv2.erode(source, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1)
        out = survived if out is None else cv2.bitwise_and(out, survived)
    return out.view(bool)


@functools.cache
def _disk_rectangles(radius: int) -> tuple[tuple[int, int], ...]:
    """(half-height, half-width) of the fewest rectangles whose union is the digital disk of
    `radius`: for each half-width, the tallest half-height that keeps it inside."""
    tallest: dict[int, int] = {}
    for height in range(radius + 1):
        tallest[math.isqrt(radius * radius - height * height)] = height
    return tuple((height, width) for width, height in tallest.items())


def colour_distance(mean_rgb: np.ndarray, colour_stats: dict) -> float:
    delta = np.asarray(mean_rgb, np.float64) - np.asarray(colour_stats["mean"])
    return float(np.sqrt(delta @ np.asarray(colour_stats["inverse_covariance"]) @ delta))


def fit(measured: list[dict[str, float]], mean_colours: np.ndarray) -> dict:
    """Accepted ranges from the developer set's statistics (and its mean-colour distribution)."""
    colour = {"mean": mean_colours.mean(axis=0).tolist(),
              "inverse_covariance": np.linalg.inv(np.cov(mean_colours.T)).tolist()}
    ranges = {}
    for name, (_, _, side, slack) in CHECKS.items():
        values = np.array([m[name] for m in measured] if name != "colour_distance"
                          else [colour_distance(c, colour) for c in mean_colours])
        lo, hi = np.percentile(values, [PERCENTILE, 100 - PERCENTILE])
        spread = max(MARGIN * (np.percentile(values, 99) - np.percentile(values, 1)), slack)
        ranges[name] = [float(lo - spread) if side in ("low", "both") else None,
                        float(hi + spread) if side in ("high", "both") else None]
    return {"ranges": ranges, "colour": colour,
            "fitted_on": f"{len(measured)} developer-set cells: {PERCENTILE}th/{100 - PERCENTILE}th percentiles "
                         f"widened by {MARGIN} of the 1st-99th percentile spread"}


def check(rgb: np.ndarray, gate: dict, mask: np.ndarray | None = None) -> list[QualityIssue]:
    """The reasons `rgb` fails the gate (empty: it passes)."""
    stats = measure(rgb, gate["colour"], mask)
    issues = []
    for name, (code, what, _, _) in CHECKS.items():
        low, high = gate["ranges"][name]
        value = stats[name]
        if _outside(value, gate["ranges"][name]):
            accepted = f"[{'-inf' if low is None else f'{low:.3g}'}, {'inf' if high is None else f'{high:.3g}'}]"
            issues.append(QualityIssue(code, f"{what} is {value:.3g}, outside the training range {accepted}", value,
                                       -np.inf if low is None else low, np.inf if high is None else high))
        if code == "NO_CELL" and issues:  # nothing else can be measured without a cell
            break
    return issues


def _measure_file(path: str) -> tuple[dict[str, float], np.ndarray | None]:
    from PIL import Image

    from dxserve.images import to_rgb

    with Image.open(path) as image:
        return _measure(to_rgb(image))  # decoded as the server decodes requests


def fit_on_files(paths: list[str], workers: int = 2) -> dict:
    """`fit` on image files (the developer set), with its own pass rate per check."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        measured = list(pool.map(_measure_file, paths, chunksize=32))
    stats, colours = [m for m, _ in measured], np.array([c for _, c in measured])
    gate = fit(stats, colours)
    failed = {code: 0 for code, *_ in CHECKS.values()}
    passed = 0
    for m, c in zip(stats, colours, strict=True):
        m = {**m, "colour_distance": colour_distance(c, gate["colour"])}
        codes = [code for name, (code, *_) in CHECKS.items() if _outside(m[name], gate["ranges"][name])]
        for code in codes:
            failed[code] += 1
        passed += not codes
    gate["developer_set"] = {"images": len(paths), "pass_rate": passed / len(paths), "failed_per_code": failed}
    return gate


def _outside(value: float, accepted: list) -> bool:
    low, high = accepted
    return (low is not None and value < low) or (high is not None and value > high)
