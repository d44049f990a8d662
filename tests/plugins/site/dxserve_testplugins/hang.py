"""A plugin whose model call hangs on pure yellow (255, 255, 0) images, and whose
preprocessing hangs on pure magenta (255, 0, 255) ones, for as long as the file named by
$DXSERVE_HANG_FILE exists, and takes $DXSERVE_HANG_BATCH_S seconds over every
batch (default 0): a slow model; its explanations take $DXSERVE_HANG_EXPLAIN_S (default 1)
(not an entry point: tests add it through settings.plugins)."""

import os
import time
from pathlib import Path

import numpy as np

from dxserve import Explanation, hookimpl

from .brightness import BrightnessRuntime, PluginInfo


class HangRuntime(BrightnessRuntime):
    info = PluginInfo(**{**vars(BrightnessRuntime.info), "name": "hang", "description": "hangs on yellow images"})

    def preprocess(self, image):
        if tuple(image[0, 0]) == (255, 0, 255):
            hold = Path(os.environ["DXSERVE_HANG_FILE"])
            while hold.exists():
                time.sleep(0.05)
        return super().preprocess(image)

    def predict(self, batch):
        time.sleep(float(os.environ.get("DXSERVE_HANG_BATCH_S", "0")))
        if np.any(np.all(batch[:, 0, 0] == np.array([1.0, 1.0, 0.0]), axis=-1)):
            hold = Path(os.environ["DXSERVE_HANG_FILE"])
            while hold.exists():
                time.sleep(0.05)
        return super().predict(batch)

    def explain(self, image):
        time.sleep(float(os.environ.get("DXSERVE_HANG_EXPLAIN_S", "1")))
        return Explanation(np.full(image.shape[:2], 0.5, np.float32), "bright", "uniform (a test)")


@hookimpl
def dxserve_model_runtimes():
    return [HangRuntime]
