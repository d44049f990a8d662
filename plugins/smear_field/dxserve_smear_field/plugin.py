"""The smear-field plugin: white cells found in a stained blood-smear field, each handed to
`lymphoblast` (its quality gate, out-of-distribution check, decision and audit row apply to
every cell). A field plugin (PluginInfo.objects_plugin): see dxserve.runtime.ModelRuntime.find_objects."""

from __future__ import annotations

from pathlib import Path

from dxserve import (OUT_OF_DISTRIBUTION, QUALITY_GATE, FoundObject, InputSpec, ModelRuntime, ModelVersion, PluginInfo,
                     hookimpl)
from dxserve.runtime import sha256_of

from . import detect

PLUGIN_VERSION = "0.2.0"
DETECTORS = Path(__file__).parent / "detector"
EXAMPLES = Path(__file__).parent / "examples"
#: Each detector version's parameters and their SHA-256 (checked before loading, like weights); the
#: first is the default. 1.1.0: 1.0.0, with large fields whose scale is given searched coarsely.
SHIPPED = {"1.1.0": "a98c0dc48a7e65b3414ab65ffa0119b1a422907f4ca1b27969a3e0b1e2a64ccd",
           "1.0.0": "6d506e89009c689a0d59c6afb35f0dcf8c0edf4c0f663efb776d1d35a591d49a"}


def version_folder(version: str) -> Path:
    return DETECTORS / version


class SmearFieldRuntime(ModelRuntime):
    info = PluginInfo(
        name="smear-field",
        version=PLUGIN_VERSION,
        description="finds and segments white cells in a stained peripheral-blood or marrow smear field (classical "
                    "colour and morphology, OpenCV) and has the lymphoblast plugin classify each",
        labels=("classified",),
        input=InputSpec(description="a whole microscope field (RGB), e.g. 640 x 480 px; send microns_per_pixel when known",
                        min_side=64),
        intended_use="research: finding white cells in smear fields for the lymphoblast classifier; decision support, "
                     "not a diagnosis",
        objects_plugin="lymphoblast",
    )

    @classmethod
    def versions(cls) -> list[ModelVersion]:
        return [ModelVersion(name, version_folder(name) / "parameters.json", digest,
                             model_card=(version_folder(name) / "MODEL_CARD.md").read_text())
                for name, digest in SHIPPED.items()]

    def load(self) -> None:
        self.parameters = detect.Parameters.load(self.version.weights)

    def find_objects(self, image, microns_per_pixel: float = 0.0):
        cells, issues = detect.find(image, self.parameters, microns_per_pixel)
        return [FoundObject(cell.box, cell.crop, cell.mask) for cell in cells], issues

    def adapt(self, labelled, unlabelled, folder: Path):
        """A site version: the scale, burnt-in marks and field gate measured on the lab's fields, and
        a site's profile (adaptation.py). `labelled`: fields that show a white cell."""
        from . import adaptation

        return adaptation.adapt(self.parameters, labelled, unlabelled, folder)

    @classmethod
    def safety_checks(cls, version: ModelVersion) -> frozenset[str]:
        # Its own gate refuses what is not a usable field; every cell it finds then passes the
        # lymphoblast plugin's own quality gate and out-of-distribution check before any call.
        return frozenset({QUALITY_GATE, OUT_OF_DISTRIBUTION})

    @classmethod
    def examples(cls) -> list[Path]:
        return sorted(EXAMPLES.glob("*.jpg"))


@hookimpl
def dxserve_model_runtimes():
    return [SmearFieldRuntime]


if __name__ == "__main__":  # python -m dxserve_smear_field.plugin: the parameters' SHA-256 to put in SHIPPED
    for name in SHIPPED:
        print(name, sha256_of(version_folder(name) / "parameters.json"))
