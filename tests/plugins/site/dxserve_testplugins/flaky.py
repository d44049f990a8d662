"""A plugin that raises on one kind of image, pure magenta (255, 0, 255) pixels, and takes
a second over pure cyan (0, 255, 255) ones."""

import time

import numpy as np

from dxserve import hookimpl

from .brightness import BrightnessRuntime, PluginInfo


class FlakyRuntime(BrightnessRuntime):
    info = PluginInfo(**{**vars(BrightnessRuntime.info), "name": "flaky", "description": "raises on magenta images, is slow on cyan ones"})

    def predict(self, batch):
        if np.any(np.all(batch[:, 0, 0] == np.array([1.0, 0.0, 1.0]), axis=-1)):
            raise RuntimeError("magenta breaks this model")
        if np.any(np.all(batch[:, 0, 0] == np.array([0.0, 1.0, 1.0]), axis=-1)):
            time.sleep(1.0)
        return super().predict(batch)


@hookimpl
def dxserve_model_runtimes():
    return [FlakyRuntime]
