"""A tiny field plugin: it cuts an image into 16 x 16 px tiles and has `brightness` classify each.

The second example of plugins calling plugins (after smear-field): a pure-black tile is handed
over as an empty crop, so one object of a field fails while its others are classified; a
pure-white image fails the field's own gate; a 17 px wide one makes it raise."""

from pathlib import Path

import numpy as np

from dxserve import FoundObject, InputSpec, ModelRuntime, ModelVersion, PluginInfo, QualityIssue, hookimpl

TILE = 16
WEIGHTS = Path(__file__).parent / "brightness-weights.json"
WEIGHTS_SHA256 = "cfa04032fe0f1f4b055a0aa8caa60cba2ac48d5dea6d29e4070c33d92c7c059b"


class TilesRuntime(ModelRuntime):
    info = PluginInfo(name="tiles", version="0.1.0", description="16 px tiles, each classified by brightness",
                      labels=("classified",), input=InputSpec(description="any image"), intended_use="tests only",
                      objects_plugin="brightness")

    @classmethod
    def versions(cls):
        return [ModelVersion("1.0", WEIGHTS, WEIGHTS_SHA256)]

    def load(self):
        pass

    def find_objects(self, image, microns_per_pixel=0.0):
        if image.shape[1] == 17:  # a deliberate fault, for the tests: the plugin raises on this field
            raise RuntimeError("tiles cannot cut a 17 px wide field")
        if image.min() == 255:
            return [], [QualityIssue("BLANK", "the field is white: nothing to find", 255.0, 0.0, 254.0)]
        found = []
        for y in range(0, image.shape[0], TILE):
            for x in range(0, image.shape[1], TILE):
                tile = image[y:y + TILE, x:x + TILE]
                crop = tile[:0] if not tile.any() else tile  # a black tile: a bad crop (no pixels)
                mask = np.ones(tile.shape[:2], bool)
                found.append(FoundObject((x, y, tile.shape[1], tile.shape[0]), crop, mask))
        return found, []


@hookimpl
def dxserve_model_runtimes():
    return [TilesRuntime]
