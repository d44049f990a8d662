"""A plugin whose weights file is missing."""

from pathlib import Path

from dxserve import hookimpl

from .brightness import BrightnessRuntime, ModelVersion, PluginInfo


class BrokenLoadRuntime(BrightnessRuntime):
    info = PluginInfo(**{**vars(BrightnessRuntime.info), "name": "broken_load", "description": "weights missing"})

    @classmethod
    def versions(cls):
        return [ModelVersion("1.0", Path(__file__).parent / "missing-weights.json", "0" * 64)]


@hookimpl
def dxserve_model_runtimes():
    return [BrokenLoadRuntime]
