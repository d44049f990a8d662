"""Occlusion maps: which parts of the cell the served score depends on.

Each 32 px square of the model's 224 px input that touches the cell is blacked out (the
segmentation's background colour) in turn, with stride 16; the drop of the served logit
(all its orientations, as served) when a square is hidden is spread over that square, and the
squares overlapping a pixel are averaged. Only drops that count against the explained label
are kept (the positive part), and the map is scaled to [0, 1]. The cell's size, a separate
input of the head, is held at its measured value, so the map shows shape and texture only.

Why occlusion and not Grad-CAM: in this model Grad-CAM (tried on blocks 11 and 13 at both
scales, also relative to an empty frame) put much of its weight on the black background
around the cell (for the fixture blasts only 36-55 % of the map's mass lay on the cell, whose
area is about 20 % of the image), because the coarse 4x4 and 7x7 maps bleed past its outline.
Occlusion is exact about what it measures: hiding background changes nothing, so background
scores zero unless it shares a square with the cell (on the fixtures 57-92 % of the mass lies
on the cell). It costs about 150 model passes per explained image (about 1 s on 2 CPU cores),
paid only by requests that ask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .preprocess import BACKGROUND_MAX

# Occluded copies per model call: small, so that a classification batch waiting behind one
# (ModelRuntime.background) waits tens of milliseconds, not most of a second.
PATCH, STRIDE, BATCH = 32, 16, 2
METHOD = (f"occlusion: each {PATCH} px square of the cell's {{size}} px input (stride {STRIDE}) blacked out in turn; "
          "the drop of the served logit for the explained label, averaged over the squares covering each pixel, "
          "positive part, scaled to [0, 1]; the cell's size input held fixed")


def occlusion_map(logits: Callable[[np.ndarray], np.ndarray], record: np.void, sign: float = 1.0) -> np.ndarray:
    """Heatmap over the model's input square for one `preprocess.model_input` record: float32
    (size, size) in [0, 1]. `logits` maps a batch of records to the served logits; `sign` 1
    explains the logit (e.g. "lymphoblast"), -1 its opposite ("normal")."""
    cell = record["cell"]
    size = cell.shape[0]
    starts = range(0, max(size - PATCH, 0) + 1, STRIDE)
    squares = [(y, x) for y in starts for x in starts if cell[y:y + PATCH, x:x + PATCH].max() > BACKGROUND_MAX]
    base = float(logits(record[None])[0])
    drops = []
    for first in range(0, len(squares), BATCH):
        chunk = squares[first:first + BATCH]
        batch = np.repeat(record[None], len(chunk))
        for i, (y, x) in enumerate(chunk):
            batch["cell"][i, y:y + PATCH, x:x + PATCH] = 0
        drops.append(sign * (base - logits(batch)))
    heat, cover = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    for drop, (y, x) in zip(np.concatenate(drops) if drops else [], squares, strict=True):
        heat[y:y + PATCH, x:x + PATCH] += drop
        cover[y:y + PATCH, x:x + PATCH] += 1
    heat = np.maximum(heat / np.maximum(cover, 1), 0)
    peak = heat.max()
    return heat / peak if peak > 0 else heat
