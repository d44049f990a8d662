"""A plugin whose load blocks until the test releases it (not an entry point: tests add it
through settings.plugins)."""

import threading

from dxserve import hookimpl

from .brightness import BrightnessRuntime, PluginInfo

RELEASE = threading.Event()


class SlowRuntime(BrightnessRuntime):
    info = PluginInfo(**{**vars(BrightnessRuntime.info), "name": "slow", "description": "loads until released"})

    def load(self):
        RELEASE.wait(60)
        super().load()


@hookimpl
def dxserve_model_runtimes():
    return [SlowRuntime]
