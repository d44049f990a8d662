"""A second, independent plugin: dark vs bright by mean intensity, with a one-number model."""

import json
import os
from pathlib import Path

import numpy as np

from dxserve import InputSpec, ModelRuntime, ModelVersion, PluginInfo, hookimpl

WEIGHTS = Path(__file__).parent / "brightness-weights.json"
WEIGHTS_SHA256 = "cfa04032fe0f1f4b055a0aa8caa60cba2ac48d5dea6d29e4070c33d92c7c059b"


class BrightnessRuntime(ModelRuntime):
    info = PluginInfo(
        name="brightness",
        version="0.1.0",
        description="dark vs bright image, by mean intensity",
        labels=("dark", "bright"),
        input=InputSpec(description="any image"),
        intended_use="tests only",
    )
    max_batch_size = 8

    @classmethod
    def versions(cls):
        """2.0, plus each <version>.json in $DXSERVE_BRIGHTNESS_VERSIONS with its declared hash
        in <version>.sha256 (the reload tests add versions there); newest first."""
        found = [ModelVersion("2.0", WEIGHTS, WEIGHTS_SHA256, model_card="# brightness 2.0")]
        folder = Path(os.environ.get("DXSERVE_BRIGHTNESS_VERSIONS", "/nonexistent"))
        for weights in folder.glob("*.json"):
            found.append(ModelVersion(weights.stem, weights, weights.with_suffix(".sha256").read_text().strip()))
        return sorted(found, key=lambda v: float(v.version), reverse=True)

    def load(self):
        self.threshold = json.loads(self.version.weights.read_text())["threshold"]

    def predict(self, batch):
        mean = batch.mean(axis=(1, 2, 3))
        p_bright = 1 / (1 + np.exp(-(mean - self.threshold) * 20))
        return np.stack([1 - p_bright, p_bright], axis=1)


@hookimpl
def dxserve_model_runtimes():
    return [BrightnessRuntime]
