"""Finding and segmenting white cells in a stained blood-smear field (classical, OpenCV).

Each step is one function, its figures in `Parameters` (micrometres, so they hold at any
magnification once the field's scale is known):

1. `scale`: the field's pixels per micrometre, from the request or from its red cells (their
   diameter, about 7.5 um, measured by a distance transform of the filled red-cell mask);
2. `field_issues`: the field's own gate: not a stained smear (blank, noise, a photo), no
   stained cells, out of focus;
3. `nuclei`: white-cell nuclei are the field's saturated violet pixels (red cells are pink,
   the background pale); lobes of one nucleus are merged by a dilation;
4. `cells`: each nucleus grown by a cytoplasm rim is one cell: its box, its mask, and the
   crop the lymphoblast classifier expects (the cell on black, centred on a 450 px canvas, at
   the C-NMC scale).

Why classical and not a trained detector: on BCCD's train and validation splits this finds
white cells at recall 0.97 / 1.00 and precision 0.95 / 0.98 (IoU >= 0.5) in about 7 ms a field
on one core, with nothing to train or ship; the figures of every split are in the model card.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dxserve import QualityIssue


@dataclass(frozen=True)
class Parameters:
    """The detector's figures; a model version's parameters.json holds them."""

    nucleus_hue: tuple[float, float]  # violet, as a fraction of the hue circle
    nucleus_min_saturation: float
    nucleus_open_um: float  # removes specks
    merge_um: float  # lobes closer than this are one nucleus
    min_nucleus_area_um2: float
    pad_um: float  # box margin around the nucleus
    cytoplasm_um: float  # the cell's rim beyond its nucleus, for the mask
    max_cell_um: float  # a box wider than this is a clump of cells
    rbc_min_saturation: float
    rbc_radius_quantile: float
    rbc_peak_window_px: int  # one distance peak per red cell within this window
    rbc_min_radius_px: float  # smaller peaks are fragments (so red cells under 2x this are not measured)
    rbc_estimate_factor: float  # the estimate's bias on BCCD's annotated red cells (train split)
    rbc_diameter_um: float
    min_red_cells: int
    classifier_px_per_um: float  # the scale of the classifier's training cells (see the model card)
    canvas: int  # side of the classifier's square, black canvas
    min_stained_fraction: float  # of the field's pixels: below, no cells to find
    min_smear_hue_fraction: float  # of its saturated pixels in pink, red or violet: below, not a stained smear
    min_focus: float  # variance of the Laplacian of the grey field: below, out of focus
    #: A site's fields (a site profile's `detector` overrides, see `with_overrides`): a clump
    #: is left out and the other cells kept, instead of refusing the field (1.0.0: refuse).
    skip_clumps: bool = False
    #: Leave out a cell whose box touches the field's edge (part of it is outside the field).
    drop_border_cells: bool = False
    #: Lowest nucleus saturation a field's own threshold may go to (0: the fixed
    #: `nucleus_min_saturation` only). Above 0, a field in which the fixed threshold finds no
    #: cell is searched again with its own threshold, Otsu's split of the saturation of its
    #: violet-hued pixels, kept between this and `nucleus_min_saturation`: a lab whose blasts
    #: stain paler (Aria's Pro-B fields) still has its nuclei found.
    nucleus_min_saturation_floor: float = 0.0
    #: The site's pixel size, measured on its own fields (`adaptation.fit`): used when a request
    #: gives none, before the field's red cells (0: none; 1.0.0 measures every field).
    site_microns_per_pixel: float = 0.0
    #: Boxes (x0, y0, x1, y1 as fractions of the field) of marks burnt into every field of a site
    #: (a scale bar, a label), painted over with the field's plasma before anything is measured.
    mask_boxes: tuple = ()
    #: A field of more pixels than this whose scale is given (the request's `microns_per_pixel`, or
    #: the site's) is searched at a coarser scale (0: never, as 1.0.0): the field gate's colour
    #: shares and the nuclei on every k-th pixel of every k-th row, k the least step that brings
    #: the field under this many pixels but keeps `work_min_px_per_um`; focus, and each cell's
    #: mask and crop, on the field itself. Not on a scale measured from the field's red cells:
    #: measured on fewer of them it moved by up to a fifth (benchmarks/RESULTS.md).
    work_max_pixels: int = 0
    work_min_px_per_um: float = 4.0

    def with_overrides(self, overrides: dict) -> "Parameters":
        """These parameters with some replaced (a site's profile); an unknown name is a ValueError."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown detector parameters: {', '.join(sorted(unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return dataclasses.replace(self, **values)

    @classmethod
    def load(cls, path: Path) -> "Parameters":
        values = json.loads(path.read_text())
        values["nucleus_hue"] = tuple(values["nucleus_hue"])
        return cls(**values)


@dataclass(frozen=True)
class Cell:
    box: tuple[int, int, int, int]  # x, y, width, height in the field
    mask: np.ndarray  # bool (height, width): the cell within its box
    crop: np.ndarray  # uint8 RGB (canvas, canvas, 3): the cell on black at the classifier's scale


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue and saturation as float32 fractions (for measuring a site's fields, `adaptation.py`)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # hue and saturation 0..255
    return hsv[..., 0].astype(np.float32) / 255, hsv[..., 1].astype(np.float32) / 255


_LEVELS = np.arange(256, dtype=np.float32) / 255  # a channel's 0..255 as the fractions thresholds are given in
BAND = 1024  # rows worked on at once where a whole-field float array would cost hundreds of MB (issue 32)


class _HSV:
    """A field's hue and saturation, kept as uint8 and compared with fractional thresholds through
    256-entry tables: the same float32 comparisons as fractions of the whole field, without a
    float copy of it (a 25 Mpx field: 200 MB less). The tables are applied by OpenCV's LUT, about
    8x faster than indexing with the channel in numpy (the same masks)."""

    def __init__(self, rgb: np.ndarray):
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # each 0..255; the two planes used, contiguous, not the value
        self.hue, self.saturation = cv2.extractChannel(hsv, 0), cv2.extractChannel(hsv, 1)

    @staticmethod
    def above(channel: np.ndarray, threshold: float) -> np.ndarray:
        return cv2.LUT(channel, (_LEVELS > threshold).astype(np.uint8)).view(bool)

    @staticmethod
    def below(channel: np.ndarray, threshold: float) -> np.ndarray:
        return cv2.LUT(channel, (_LEVELS < threshold).astype(np.uint8)).view(bool)


def _peaks(distance: np.ndarray, window: int, floor: float) -> np.ndarray:
    """The values of `distance` at its local maxima within a `window` px disk, above `floor`, in
    row order: the pixels equal to their grey dilation by the disk, exactly, without dilating the
    field by the disk (0.75 of a 15 Mpx field's 1.6 s of detection, issue 32). A peak of the disk
    is a peak of the square inscribed in it, so the square's dilation (separable, a few times
    cheaper) finds the candidates, and each is checked against its own disk; a field with more
    candidates than PEAK_CANDIDATES (long ridges of equal distance) is dilated by the disk as before."""
    kernel = _disk(window)
    reach = kernel.shape[0] // 2
    half = _inscribed_half_side(kernel)
    square = np.ones((2 * half + 1, 2 * half + 1), np.uint8)
    rows, cols = [], []
    for top, band, dilated in _dilated_bands(distance, square, half):
        y, x = np.nonzero((band == dilated) & (band > floor))
        rows.append(y + top)
        cols.append(x)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    if len(rows) > PEAK_CANDIDATES:
        return np.concatenate([band[(band == dilated) & (band > floor)]
                               for _, band, dilated in _dilated_bands(distance, kernel, reach)])
    dy, dx = np.nonzero(kernel)
    dy, dx = dy - reach, dx - reach
    height, width = distance.shape
    keep = np.zeros(len(rows), bool)
    for start in range(0, len(rows), 512):
        y, x = rows[start:start + 512, None] + dy, cols[start:start + 512, None] + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)  # beyond the field: nothing, as in a dilation
        around = np.where(inside, distance[y.clip(0, height - 1), x.clip(0, width - 1)], -1.0)  # below any distance
        keep[start:start + 512] = distance[rows[start:start + 512], cols[start:start + 512]] >= around.max(axis=1)
    return distance[rows[keep], cols[keep]]


PEAK_CANDIDATES = 200_000  # about 0.4 s of checking against the disk: beyond, dilating the field by it is cheaper


def _dilated_bands(distance: np.ndarray, kernel: np.ndarray, reach: int):
    """(first row, band, its grey dilation by `kernel`) for bands of BAND rows: exact, as each band's
    dilation sees `reach` rows beyond it."""
    height = distance.shape[0]
    for top in range(0, height, BAND):
        low, high = max(0, top - reach), min(height, top + BAND + reach)
        band = distance[top:top + BAND]
        yield top, band, cv2.dilate(distance[low:high], kernel)[top - low:top - low + len(band)]


def _inscribed_half_side(kernel: np.ndarray) -> int:
    """The half side of the largest square, centred, whose pixels are all in `kernel`."""
    centre, half = kernel.shape[0] // 2, 0
    while half < centre and kernel[centre - half - 1:centre + half + 2, centre - half - 1:centre + half + 2].all():
        half += 1
    return half


def _sparse_dilate(mask: np.ndarray, kernel: np.ndarray, cell: int = 16) -> np.ndarray:
    """`cv2.dilate(mask, kernel)` of a uint8 mask whose pixels are few (a field's nuclei: 2 % of it),
    made only where they are. Each component's box widened by the kernel's reach holds its
    dilation; those boxes are marked on a grid of `cell` px squares, and each connected group of
    squares is dilated from the mask around it (widened by the reach again, so exactly as the
    whole field's dilation there). A 15 Mpx field's lobe merging: 0.25 s to 0.09 s (a fifth of the
    field). A mask whose groups would cover half the field is dilated whole."""
    reach = kernel.shape[0] // 2
    height, width = mask.shape
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    grid = np.zeros((height // cell + 1, width // cell + 1), np.uint8)
    for x, y, w, h in (cv2.boundingRect(c) for c in contours):
        grid[max(0, y - reach) // cell:(y + h + reach) // cell + 1, max(0, x - reach) // cell:(x + w + reach) // cell + 1] = 1
    count, _, stats, _ = cv2.connectedComponentsWithStats(grid, connectivity=8)
    regions = []
    for x, y, w, h in (stats[i, :4] * cell for i in range(1, count)):
        ox0, oy0, ox1, oy1 = int(x), int(y), min(width, int(x + w)), min(height, int(y + h))
        regions.append(((ox0, oy0, ox1, oy1), (max(0, ox0 - reach), max(0, oy0 - reach), min(width, ox1 + reach), min(height, oy1 + reach))))
    if sum((sx1 - sx0) * (sy1 - sy0) for _, (sx0, sy0, sx1, sy1) in regions) > mask.size // 2:
        return cv2.dilate(mask, kernel)
    out = np.zeros_like(mask)
    for (ox0, oy0, ox1, oy1), (sx0, sy0, sx1, sy1) in regions:
        dilated = cv2.dilate(mask[sy0:sy1, sx0:sx1], kernel)
        out[oy0:oy1, ox0:ox1] |= dilated[oy0 - sy0:oy1 - sy0, ox0 - sx0:ox1 - sx0]
    return out


def _laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the Laplacian (focus). A uint8 field's Laplacian is a small integer (|v| <= 1020), so
    it is taken as int16 (2 bytes a pixel, not the 8 of a 64-bit one) by bands of BAND rows, and each
    band's mean and spread (OpenCV, accumulated in double) are pooled: one pass, the same figure to
    about 1e-12 (a 15 Mpx field: 0.1 s to 0.03 s)."""
    height, total, squares = grey.shape[0], 0.0, 0.0
    for top in range(0, height, BAND):
        low, high = max(0, top - 1), min(height, top + BAND + 1)
        band = cv2.Laplacian(grey[low:high], cv2.CV_16S)[top - low:top - low + min(BAND, height - top)]
        mean, spread = (float(v[0, 0]) for v in cv2.meanStdDev(band))
        total += mean * band.size
        squares += (spread ** 2 + mean ** 2) * band.size
    mean = total / grey.size
    return squares / grey.size - mean ** 2


def _disk(diameter_px: float) -> np.ndarray:
    size = max(1, int(round(diameter_px)) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def scale(rgb: np.ndarray, p: Parameters, microns_per_pixel: float = 0.0) -> float:
    """Pixels per micrometre: from `microns_per_pixel` when given, else from the red cells; 0
    when neither tells (too few red cells)."""
    if microns_per_pixel > 0:
        return 1 / microns_per_pixel
    hsv = _HSV(rgb)
    low, high = p.nucleus_hue
    violet = hsv.above(hsv.hue, low) & hsv.below(hsv.hue, high) & hsv.above(hsv.saturation, p.nucleus_min_saturation)
    red = (hsv.above(hsv.saturation, p.rbc_min_saturation) & ~violet).astype(np.uint8)  # red cells, and pale cytoplasm
    del hsv, violet
    red = cv2.morphologyEx(red, cv2.MORPH_OPEN, _disk(5))
    contours, _ = cv2.findContours(red, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = cv2.drawContours(np.zeros_like(red), contours, -1, 1, thickness=cv2.FILLED)  # their pale centres too
    del red, contours
    distance = cv2.distanceTransform(filled, cv2.DIST_L2, 5)
    del filled
    peaks = _peaks(distance, p.rbc_peak_window_px, p.rbc_min_radius_px)
    if peaks.size < p.min_red_cells:
        return 0.0
    diameter_px = 2 * float(np.percentile(peaks, p.rbc_radius_quantile)) * p.rbc_estimate_factor
    # A red cell wider than the field is no measurement (a mask that fills the field gave 1e38).
    if not np.isfinite(diameter_px) or diameter_px > max(rgb.shape[:2]):
        return 0.0
    return diameter_px / p.rbc_diameter_um


def _smear_hue_share(hsv: _HSV, stained: np.ndarray, p: Parameters) -> float:
    """Share of the `stained` pixels in a smear's hues: pink and red cells, violet nuclei."""
    smear_hues = hsv.below(hsv.hue, 0.1) | hsv.above(hsv.hue, p.nucleus_hue[0])
    return float(smear_hues[stained].mean()) if stained.any() else 0.0


def smear_hue_share(rgb: np.ndarray, p: Parameters) -> float:
    """What the field gate's NOT_A_SMEAR check measures (`min_smear_hue_fraction`), for a field."""
    hsv = _HSV(rgb)
    return _smear_hue_share(hsv, hsv.above(hsv.saturation, p.rbc_min_saturation), p)


def field_issues(rgb: np.ndarray, p: Parameters, step: int = 1) -> list[QualityIssue]:
    """Why this image is not a field to find cells in; empty when it is one. `step`: the colour
    shares from every step-th pixel of every step-th row (focus always from the whole field)."""
    hsv = _HSV(_every(rgb, step))
    stained = hsv.above(hsv.saturation, p.rbc_min_saturation)
    fraction = float(stained.mean())
    if fraction < p.min_stained_fraction:
        return [QualityIssue("NO_CELLS", f"{fraction:.1%} of the field is stained: no cells to find (blank or empty field)",
                             fraction, p.min_stained_fraction, 1.0)]
    share = _smear_hue_share(hsv, stained, p)
    del hsv, stained
    if share < p.min_smear_hue_fraction:
        return [QualityIssue("NOT_A_SMEAR", f"only {share:.0%} of the stained pixels have a smear's pink, red or violet: "
                             "not a stained blood smear (noise, a photo, another stain)", share, p.min_smear_hue_fraction, 1.0)]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    focus = _laplacian_variance(grey)
    if focus < p.min_focus:
        return [QualityIssue("OUT_OF_FOCUS", f"focus {focus:.1f} (variance of the Laplacian) is below {p.min_focus:g}",
                             focus, p.min_focus, float("inf"))]
    return []


@dataclass(frozen=True)
class Nucleus:
    """One white-cell nucleus: its pixels within its bounding box, and where that box is."""

    x: int
    y: int
    mask: np.ndarray  # bool (height, width) of the box


def nuclei(rgb: np.ndarray, p: Parameters, px_per_um: float, adaptive: bool = False) -> list[Nucleus]:
    """Each white-cell nucleus (lobes merged), in reading order of its components; `adaptive`:
    with the field's own saturation threshold (`Parameters.nucleus_min_saturation_floor`).
    Each is cut from its component's bounding box, so the work is linear in the cells (a
    full-field pass per cell made a 100-cell 4,000 px field cost minutes, issue 32)."""
    return _nuclei(rgb, p, px_per_um, adaptive)[0]


def _nuclei(rgb: np.ndarray, p: Parameters, px_per_um: float, adaptive: bool) -> tuple[list[Nucleus], float]:
    """`nuclei`, and the saturation threshold they were found at."""
    violet, threshold = _violet(_HSV(rgb), p, adaptive)
    violet = cv2.morphologyEx(violet, cv2.MORPH_OPEN, _disk(p.nucleus_open_um * px_per_um))
    merged = _sparse_dilate(violet, _disk(p.merge_um * px_per_um))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(merged)
    found = []
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        nucleus = (labels[y:y + h, x:x + w] == label) & (violet[y:y + h, x:x + w] > 0)
        if nucleus.sum() >= p.min_nucleus_area_um2 * px_per_um ** 2:
            found.append(Nucleus(x, y, nucleus))
    return found, threshold


def _violet(hsv: _HSV, p: Parameters, adaptive: bool = False, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """The saturated violet pixels (uint8 0/1) and the saturation threshold: `threshold`, else the
    fixed one, else (`adaptive`) Otsu's split of the violet-hued pixels' saturation, kept between
    the floor and the fixed threshold."""
    low, high = p.nucleus_hue
    hued = hsv.above(hsv.hue, low) & hsv.below(hsv.hue, high)
    if threshold is None:
        threshold = p.nucleus_min_saturation
        if adaptive and hued.sum() > 16:
            values = np.clip(_LEVELS[hsv.saturation[hued]] * 255, 0, 255).astype(np.uint8).reshape(-1, 1)
            otsu = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] / 255
            threshold = float(np.clip(otsu, p.nucleus_min_saturation_floor, p.nucleus_min_saturation))
    return (hued & hsv.above(hsv.saturation, threshold)).astype(np.uint8), threshold


def cells(rgb: np.ndarray, p: Parameters, px_per_um: float, adaptive: bool = False,
          step: int = 1) -> tuple[list[Cell], list[QualityIssue]]:
    """The field's white cells (reading order), or the clump that makes the field unusable.
    `step`: the nuclei are found on every step-th pixel of every step-th row, then each cell is
    measured, masked and cut from the field itself."""
    height, width = rgb.shape[:2]
    found, rim = [], _disk(2 * p.cytoplasm_um * px_per_um)
    for nucleus in _nuclei_every(rgb, p, px_per_um, adaptive, step):
        rows, first, last = _row_ends(nucleus.mask)  # a row's ends: every extreme point of the nucleus is one
        xs, ys = np.concatenate([first, last]) + nucleus.x, np.concatenate([rows, rows]) + nucleus.y
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 2 * p.pad_um * px_per_um
        if side > p.max_cell_um * px_per_um:
            if p.skip_clumps:
                continue
            return [], [QualityIssue("CLUMP", f"a stained object {side / px_per_um:.0f} um across: overlapping cells, "
                                     "not one to classify", side / px_per_um, 0.0, p.max_cell_um)]
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        x1, y1 = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
        if p.drop_border_cells and (xs.min() == 0 or ys.min() == 0 or xs.max() == width - 1 or ys.max() == height - 1):
            continue  # the nucleus itself reaches the edge: part of the cell is outside the field
        # The hull and its rim drawn in the cell's own box (which holds the whole nucleus), not the field.
        hull = cv2.convexHull(np.stack([xs - x0, ys - y0], axis=1).astype(np.int32))
        body = _dilated_rows(cv2.fillConvexPoly(np.zeros((y1 - y0, x1 - x0), np.uint8), hull, 1), rim)
        found.append(((y0 // 32, x0), Cell((x0, y0, x1 - x0, y1 - y0), body, _on_canvas(rgb[y0:y1, x0:x1], body, p, px_per_um))))
    return [cell for _, cell in sorted(found, key=lambda item: item[0])], []


def _nuclei_every(rgb: np.ndarray, p: Parameters, px_per_um: float, adaptive: bool, step: int) -> list[Nucleus]:
    """`nuclei` found on every step-th pixel of every step-th row, each then taken again from the
    field itself: its violet pixels (the same threshold, opened at full resolution) within a
    step of the coarse nucleus, in the coarse nucleus's box widened by a step. So lobes are
    grouped as the coarse search grouped them, and a nucleus's extent is the field's own."""
    if step == 1:
        return nuclei(rgb, p, px_per_um, adaptive)
    height, width = rgb.shape[:2]
    coarse, threshold = _nuclei(_every(rgb, step), p, px_per_um / step, adaptive)
    opening, near = _disk(p.nucleus_open_um * px_per_um), np.ones((2 * step + 1, 2 * step + 1), np.uint8)
    out = []
    for n in coarse:
        x0, y0 = max(0, (n.x - 1) * step), max(0, (n.y - 1) * step)
        x1, y1 = min(width, (n.x + n.mask.shape[1] + 1) * step), min(height, (n.y + n.mask.shape[0] + 1) * step)
        around = np.zeros((y1 - y0, x1 - x0), np.uint8)
        upscaled = np.repeat(np.repeat(n.mask, step, axis=0), step, axis=1).view(np.uint8)
        top, left = n.y * step - y0, n.x * step - x0
        around[top:top + upscaled.shape[0], left:left + upscaled.shape[1]] = upscaled[:y1 - y0 - top, :x1 - x0 - left]
        violet, _ = _violet(_HSV(np.ascontiguousarray(rgb[y0:y1, x0:x1])), p, threshold=threshold)
        mask = (cv2.morphologyEx(violet, cv2.MORPH_OPEN, opening) > 0) & (cv2.dilate(around, near) > 0)
        if not mask.any():  # nothing left at full resolution: the coarse nucleus as it was found
            mask = around > 0
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        out.append(Nucleus(x0 + int(columns[0]), y0 + int(rows[0]), mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]))
    return out


def _dilated_rows(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """`cv2.dilate(mask, kernel) > 0` for a filled convex polygon (each row one run, the rows
    consecutive and each run touching the next) and a kernel whose every row is one centred run
    (an ellipse). Row y of the result is the union over the kernel's rows of mask row y + dy's
    run widened by that kernel row's half width; runs of neighbouring rows touch, so that union
    is one run, from the least start to the greatest end. Exactly OpenCV's dilation, without its
    cost for a cell's 81 px disk (4.5 ms a cell); any other mask is dilated by OpenCV."""
    height, width = mask.shape
    rows, first, last = _row_ends(mask)
    if not len(rows) or rows[-1] - rows[0] + 1 != len(rows) or not _centred_runs(kernel) \
            or np.any(mask[rows].sum(axis=1, dtype=np.int64) != last - first + 1) \
            or np.any(first[1:] > last[:-1] + 1) or np.any(last[1:] < first[:-1] - 1):
        return cv2.dilate(mask, kernel) > 0
    reach = kernel.shape[0] // 2
    half = (kernel.sum(axis=1, dtype=np.int64) // 2)[:, None]
    source = np.arange(height)[None, :] + np.arange(-reach, reach + 1)[:, None] - rows[0]  # (kernel row, output row)
    valid = (source >= 0) & (source < len(rows))
    source = source.clip(0, len(rows) - 1)
    start = np.where(valid, first[source] - half, width).min(axis=0)
    end = np.where(valid, last[source] + half, -1).max(axis=0)
    columns = np.arange(width)[None, :]
    return (columns >= start[:, None]) & (columns <= end[:, None])


def _row_ends(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows that hold a pixel of `mask`, and the first and last column of each."""
    rows = np.flatnonzero(mask.any(axis=1))
    return rows, mask[rows].argmax(axis=1), mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)


def _centred_runs(kernel: np.ndarray) -> bool:
    """Whether every row of an odd square kernel is one run of odd length centred on its middle column."""
    size = kernel.shape[0]
    half = kernel.sum(axis=1, dtype=np.int64) // 2
    columns = np.abs(np.arange(size) - size // 2)
    return size % 2 == 1 and kernel.shape[1] == size and bool(np.all(kernel.sum(axis=1) % 2 == 1)) \
        and bool(np.array_equal(kernel > 0, columns[None, :] <= half[:, None]))


def _on_canvas(box: np.ndarray, mask: np.ndarray, p: Parameters, px_per_um: float) -> np.ndarray:
    """The cell on black, rescaled to the classifier's scale, centred on its canvas (cut to it if larger)."""
    cell = cv2.bitwise_and(box, box, mask=np.ascontiguousarray(mask).view(np.uint8))  # np.where: 0.5 ms a cell
    factor = p.classifier_px_per_um / px_per_um
    size = (max(1, round(cell.shape[1] * factor)), max(1, round(cell.shape[0] * factor)))
    cell = cv2.resize(cell, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros((p.canvas, p.canvas, 3), np.uint8)
    h, w = min(cell.shape[0], p.canvas), min(cell.shape[1], p.canvas)
    top, left = (p.canvas - h) // 2, (p.canvas - w) // 2
    cy, cx = (cell.shape[0] - h) // 2, (cell.shape[1] - w) // 2
    canvas[top:top + h, left:left + w] = cell[cy:cy + h, cx:cx + w]
    return canvas


def mask_boxes(rgb: np.ndarray, boxes) -> np.ndarray:
    """The field with each box (fractions: x0, y0, x1, y1) painted its plasma's colour (the 90th percentile)."""
    if not len(boxes):
        return rgb
    out = rgb.copy()
    height, width = rgb.shape[:2]
    plasma = np.percentile(rgb.reshape(-1, 3), 90, axis=0).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        out[int(y0 * height):int(np.ceil(y1 * height)), int(x0 * width):int(np.ceil(x1 * width))] = plasma
    return out


def find(rgb: np.ndarray, p: Parameters, microns_per_pixel: float = 0.0) -> tuple[list[Cell], list[QualityIssue]]:
    """The white cells of a field and the field's issues (no cell is returned with issues). The
    scale: the request's `microns_per_pixel`, else the site's, else the field's red cells."""
    rgb = mask_boxes(rgb, p.mask_boxes)
    microns_per_pixel = microns_per_pixel or p.site_microns_per_pixel
    step = coarse_step(rgb, p, microns_per_pixel)
    issues = field_issues(rgb, p, step)
    if issues:
        return [], issues
    px_per_um = scale(rgb, p, microns_per_pixel)
    if px_per_um <= 0:
        return [], [QualityIssue("SCALE_UNKNOWN", "too few red cells to measure the field's scale; send microns_per_pixel",
                                 0.0, float(p.min_red_cells), float("inf"))]
    found, issues = cells(rgb, p, px_per_um, step=step)
    if not found and not issues and p.nucleus_min_saturation_floor > 0:  # paler nuclei than the fixed threshold takes
        found, issues = cells(rgb, p, px_per_um, adaptive=True, step=step)
    return found, issues


def coarse_step(rgb: np.ndarray, p: Parameters, microns_per_pixel: float) -> int:
    """How coarsely a field is searched (`Parameters.work_max_pixels`): the least k for which the
    field's pixels over k squared are at most that many, no coarser than `work_min_px_per_um`; 1
    (the whole field) without a given scale, for a field within the limit, or when the limit is 0."""
    pixels = rgb.shape[0] * rgb.shape[1]
    if not p.work_max_pixels or pixels <= p.work_max_pixels or microns_per_pixel <= 0:
        return 1
    return max(1, min(math.ceil(math.sqrt(pixels / p.work_max_pixels)), int(1 / microns_per_pixel / p.work_min_px_per_um)))


def _every(rgb: np.ndarray, step: int) -> np.ndarray:
    return rgb if step == 1 else np.ascontiguousarray(rgb[::step, ::step])
