"""A plugin whose model call hangs on pure yellow (255, 255, 0) images for as long as the
file named by $DXSERVE_HANG_FILE exists (not an entry point: tests add it through
settings.plugins)."""

import os
import time
from pathlib import Path

import numpy as np

from dxserve import hookimpl

from .brightness import BrightnessRuntime, PluginInfo


class HangRuntime(BrightnessRuntime):
    info = PluginInfo(**{**vars(BrightnessRuntime.info), "name": "hang", "description": "hangs on yellow images"})

    def predict(self, batch):
        if np.any(np.all(batch[:, 0, 0] == np.array([1.0, 1.0, 0.0]), axis=-1)):
            hold = Path(os.environ["DXSERVE_HANG_FILE"])
            while hold.exists():
                time.sleep(0.05)
        return super().predict(batch)


@hookimpl
def dxserve_model_runtimes():
    return [HangRuntime]
