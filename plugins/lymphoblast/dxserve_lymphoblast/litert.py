"""The served model on LiteRT (`ai_edge_litert`, XNNPACK on the CPU): no TensorFlow at serving.

`export.py` (training side, TensorFlow) writes `model.tflite`: one view of the cell, uint8
(n, s, s, 3), and its log diameter (n, 1) -> the logit (n, 1) and the CNN features (n, d).
Here the orientations a version averages over (`input.views`) are made by OpenCV and sent in the
same call, and the logits and features are averaged over them, as `plugin.averaged_over_views`
does in TensorFlow.

XNNPACK plans its work for fixed tensor shapes, so one interpreter is made per planned batch
size at load (`BATCH_SIZES`: rows of views x cells), each allocated once; a call is padded to the
next planned size (at most 2x the rows, and never past 24) and a larger one is cut into chunks of
the largest size. A planned interpreter is never resized, so no call pays for re-planning.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cv2
import numpy as np

#: Row counts (views x cells) an interpreter is planned for; calls are padded up to the next one.
BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24)


THREADS_ENV = "DXSERVE_LYMPHOBLAST_THREADS"


def default_threads() -> int:
    """XNNPACK's thread count: DXSERVE_LYMPHOBLAST_THREADS when set, else the cores this process
    may run on (its CPU affinity)."""
    if os.environ.get(THREADS_ENV, "").strip():
        return max(1, int(os.environ[THREADS_ENV]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# OpenCV's rotation for np.rot90's k quarter turns (axes 1, 2 of a batch: anticlockwise on screen).
_TURNS = (None, cv2.ROTATE_90_COUNTERCLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE)


def views_of(cells: np.ndarray, views: int) -> np.ndarray:
    """The first `views` of the 8 orientations of each cell (n, s, s, 3), view-major: (views x n, s, s, 3),
    equal to `features.view`'s (what training and the TensorFlow path use), each cell turned by
    OpenCV straight into its place: numpy's strided rot90 copy took 8x as long (4.2 against
    0.5 ms for 12 cells in 2 views). The cells must be square: OpenCV would put a turned
    non-square cell in a new array, not in its place."""
    if cells.shape[1] != cells.shape[2]:
        raise ValueError(f"views of square cells only, not {cells.shape[1]}x{cells.shape[2]}")
    n = len(cells)
    out = np.empty((views * n, *cells.shape[1:]), np.uint8)
    for k in range(views):
        turn = _TURNS[k % 4]
        for i, cell in enumerate(cells):
            place = out[k * n + i]
            if k >= 4:  # turned, then mirrored left-right
                cv2.flip(cv2.rotate(cell, turn) if turn is not None else cell, 1, dst=place)
            elif turn is not None:
                cv2.rotate(cell, turn, dst=place)
            else:
                place[...] = cell
    return out


class LiteRTModel:
    """`model.tflite` (a path, or the file's bytes: a site version keeps its graph inside its
    weights file) with one planned interpreter per batch size; thread-safe (one call at a time per
    interpreter: an explanation's passes and the server's batches of other sizes overlap)."""

    def __init__(self, model: Path | bytes, views: int = 1, threads: int | None = None, batch_sizes: tuple[int, ...] = BATCH_SIZES):
        from ai_edge_litert.interpreter import Interpreter

        self.views = views
        self.threads = threads or default_threads()
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self._planned: dict[int, tuple] = {}
        for size in batch_sizes:
            interpreter = Interpreter(model_content=content, num_threads=self.threads)
            cell, log_diameter = sorted(interpreter.get_input_details(), key=lambda d: len(d["shape"]), reverse=True)
            interpreter.resize_tensor_input(cell["index"], [size, *cell["shape"][1:]], strict=False)
            interpreter.resize_tensor_input(log_diameter["index"], [size, 1], strict=False)
            interpreter.allocate_tensors()
            outputs = sorted(interpreter.get_output_details(), key=lambda d: int(d["shape"][-1]))  # logit (1) before features
            self._planned[size] = (threading.Lock(), interpreter, cell["index"], log_diameter["index"], outputs[0]["index"],
                                   outputs[1]["index"])

    def __call__(self, cells: np.ndarray, log_diameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 cells (n, s, s, 3) and their log diameters (n,) -> logits (n,) and features (n, d),
        each averaged over the version's views."""
        n = len(cells)
        rows = views_of(cells, self.views) if self.views > 1 else np.ascontiguousarray(cells)
        sizes = np.tile(np.asarray(log_diameters, np.float32).reshape(-1, 1), (self.views, 1))
        logits, features = self._rows(rows, sizes)
        return logits.reshape(self.views, n).mean(axis=0), features.reshape(self.views, n, -1).mean(axis=0)

    def _rows(self, rows: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        largest = max(self._planned)
        logits, features = [], []
        for start in range(0, len(rows), largest):
            chunk, chunk_sizes = rows[start:start + largest], sizes[start:start + largest]
            used = len(chunk)
            planned = min(s for s in self._planned if s >= used)
            if planned > used:  # pad with copies of the last row; their outputs are dropped
                pad = planned - used
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                chunk_sizes = np.concatenate([chunk_sizes, np.repeat(chunk_sizes[-1:], pad, axis=0)])
            lock, interpreter, cell, log_diameter, logit, feature = self._planned[planned]
            with lock:
                interpreter.set_tensor(cell, chunk)
                interpreter.set_tensor(log_diameter, chunk_sizes)
                interpreter.invoke()
                logits.append(interpreter.get_tensor(logit)[:used, 0].copy())
                features.append(interpreter.get_tensor(feature)[:used].copy())
        return np.concatenate(logits), np.concatenate(features)
