"""`dxserve plugin new NAME`: a new plugin distribution that installs, serves and passes the
conformance suite as it is, for its author to replace the model in (docs/plugins.md)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

from . import __version__
from .runtime import sha256_of

NAME = re.compile(r"^[a-z][a-z0-9_]{1,40}$")
PLACEHOLDER = Path(__file__).parent / "scaffold_model.tflite"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False

PYPROJECT = '''[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "dxserve-{dist}"
version = "0.1.0"  # the plugin's code; each trained model is a model version under models/
description = "dxserve plugin {name}"
requires-python = ">=3.11"
dependencies = ["dxserve=={dxserve_version}", "numpy", "ai-edge-litert=={litert_version}"]

[project.optional-dependencies]
test = ["dxserve[testing]=={dxserve_version}"]

# The server finds the plugin through this entry point: installing the package is all it takes.
[project.entry-points.dxserve]
{name} = "{package}.plugin"

[tool.setuptools]
packages = ["{package}", "{package}.models"]

[tool.setuptools.package-data]
# Model versions are package data: without this line the weights are not installed.
"{package}.models" = ["*/*"]
'''

PLUGIN = '''"""dxserve plugin {name}: a placeholder model to replace with yours.

It calls an image "bright" or "dark" from its mean brightness (a logistic on one feature, as a
LiteRT model: `model.tflite`, the model version's weights), refuses blank and noise images (its
quality gate), and flags brightness outside what it was fitted on (its out-of-distribution
check). Serve yours the same way: export it to LiteRT (`tf.lite.TFLiteConverter`, or
`ai_edge_torch` for PyTorch) and run it with `ai_edge_litert`'s Interpreter, no training
framework in the serving install.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from dxserve import (Decision, InputSpec, ModelRuntime, ModelVersion, Prediction, PluginInfo, QualityIssue,
                     hookimpl)

MODELS = Path(__file__).parent / "models"


class Runtime(ModelRuntime):
    info = PluginInfo(
        name="{name}",
        version="0.1.0",  # the plugin's code version; model versions are listed by versions()
        description="Bright or dark, from the mean brightness (placeholder)",
        labels=("dark", "bright"),
        input=InputSpec(description="any RGB image at least 16 px on each side", min_side=16),
        intended_use="Example only; not for clinical use",
    )

    @classmethod
    def versions(cls) -> list[ModelVersion]:
        """Every models/<version>/ with its weights and card, newest first (the default)."""
        out = []
        for folder in sorted((d for d in MODELS.iterdir() if (d / "model_card.json").exists()), reverse=True):
            card = json.loads((folder / "model_card.json").read_text())
            out.append(ModelVersion(version=folder.name, weights=folder / card["weights"],
                                    weights_sha256=card["weights_sha256"],
                                    model_card=(folder / "MODEL_CARD.md").read_text(),
                                    model_card_json=json.dumps(card), extra={{"card": card}}))
        return out

    def load(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(self.version.weights), num_threads=1)
        self.interpreter.allocate_tensors()
        self.lock = threading.Lock()  # one call at a time on an interpreter
        self.fitted_range = tuple(self.version.extra["card"]["fitted_range"])

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return np.array([image.mean() / 255.0], np.float32)

    def check_quality(self, image: np.ndarray) -> list[QualityIssue]:
        gray = image.mean(axis=2)
        if gray.std() < 2.0:
            return [QualityIssue("BLANK", f"no content: brightness varies by {{gray.std():.1f}} (needs >= 2)", gray.std(), 2.0)]
        roughness = float(np.abs(np.diff(gray, axis=1)).mean())
        if roughness > 40.0:
            return [QualityIssue("NOISE", f"looks like noise: mean step between pixels {{roughness:.0f}} (accepted <= 40)",
                                 roughness, 0.0, 40.0)]
        return []

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The LiteRT model on a batch: resized to the batch's size when it changes, one call at a time."""
        with self.lock:
            source, = self.interpreter.get_input_details()
            if tuple(source["shape"]) != batch.shape:
                self.interpreter.resize_tensor_input(source["index"], list(batch.shape))
                self.interpreter.allocate_tensors()
            self.interpreter.set_tensor(source["index"], np.ascontiguousarray(batch, np.float32))
            self.interpreter.invoke()
            return self.interpreter.get_tensor(self.interpreter.get_output_details()[0]["index"]).copy()

    def predict_with_issues(self, batch: np.ndarray) -> Prediction:
        probabilities = self._run(batch).astype(np.float64)
        low, high = self.fitted_range
        issues = [[QualityIssue("OUT_OF_RANGE", f"mean brightness {{m:.2f}} outside the fitted range", m, low, high)]
                  if not low <= m <= high else [] for m in batch[:, 0]]
        return Prediction(probabilities / probabilities.sum(axis=1, keepdims=True), issues)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_with_issues(batch).probabilities

    def decide(self, probabilities: np.ndarray) -> Decision:
        top = int(np.argmax(probabilities))
        if probabilities[top] < 0.75:  # an explicit "no call" band around 0.5
            return Decision("indeterminate", True, f"P({{self.info.labels[top]}}) {{probabilities[top]:.2f}} < 0.75",
                            rule="call at P >= 0.75, else indeterminate")
        return Decision(self.info.labels[top], False, "P >= 0.75", rule="call at P >= 0.75, else indeterminate")

    @classmethod
    def examples(cls) -> list[Path]:
        return sorted((Path(__file__).parent / "examples").glob("*.png"))


@hookimpl
def dxserve_model_runtimes():
    return [Runtime]
'''

MODEL_CARD = '''# {name} {version}

- **Model**: logistic on mean brightness, as a LiteRT model (placeholder; replace with yours).
- **Weights**: `model.tflite`, SHA-256 `{sha256}` (`dxserve weights-sha256 model.tflite`).
- **Data, split and metrics**: say what it was trained on, how it was split (by subject, never
  by image), and its figures beside a trivial baseline, with their spread.
- **Intended use**: example only; not for clinical use.
'''

CONFTEST = '''import pytest


@pytest.fixture(scope="session")
def dxserve_plugin():
    """The plugin dxserve.testing's fixtures and conformance suite test."""
    return "{name}"
'''

TESTS = '''"""The server's expectations of a plugin (dxserve.testing.conformance), and this plugin's own."""

from dxserve.testing.conformance import *  # noqa: F401,F403 - collected here, run against this plugin


def test_classifies_an_example_through_the_server(dxserve_client):
    from pathlib import Path

    from {package}.plugin import Runtime

    result = dxserve_client.classify(Path(Runtime.examples()[0]), plugin="{name}")
    assert result.ok and result.top_label in ("dark", "bright")
'''

README = '''# dxserve-{dist}

A dxserve plugin, made by `dxserve plugin new {name}`.

    pip install -e ".[test]"          # the plugin, and dxserve.testing
    pytest                            # the conformance suite and your tests, against a real server
    dxserve serve                     # serves it (entry point "{name}")

A new model version: a folder `{package}/models/<version>/` with the weights (a LiteRT
`model.tflite`, exported from your training framework), `MODEL_CARD.md` and `model_card.json`
(its `weights_sha256` from `dxserve weights-sha256 FILE`).
'''


def new_plugin(name: str, parent: Path) -> Path:
    """Write the plugin `name` into parent/name; returns that folder."""
    if not NAME.match(name):
        raise ValueError(f"plugin name {name!r}: use lower case letters, digits and _ (2-41 characters, a letter first)")
    root = parent / name
    if root.exists():
        raise FileExistsError(f"{root} exists: not overwritten")
    package = f"dxserve_{name}"
    fields = {"name": name, "dist": name.replace("_", "-"), "package": package, "dxserve_version": __version__,
              "litert_version": importlib.metadata.version("ai-edge-litert") if _installed("ai-edge-litert") else "2.3.0"}
    version = "1.0.0"
    model = root / package / "models" / version
    model.mkdir(parents=True)
    (root / "tests").mkdir()
    (root / package / "examples").mkdir()
    weights = model / "model.tflite"
    shutil.copyfile(PLACEHOLDER, weights)  # made by scripts/make_scaffold_model.py
    sha256 = sha256_of(weights)
    (model / "model_card.json").write_text(json.dumps({"version": version, "weights": weights.name, "weights_sha256": sha256,
                                                       "fitted_range": [0.02, 0.98]}, indent=1) + "\n")
    (model / "MODEL_CARD.md").write_text(MODEL_CARD.format(version=version, sha256=sha256, **fields))
    (root / "pyproject.toml").write_text(PYPROJECT.format(**fields))
    (root / "README.md").write_text(README.format(**fields))
    (root / package / "__init__.py").write_text(f'"""dxserve plugin {name}."""\n')
    (root / package / "plugin.py").write_text(PLUGIN.format(**fields))
    (root / "tests" / "conftest.py").write_text(CONFTEST.format(**fields))
    (root / "tests" / "test_plugin.py").write_text(TESTS.format(**fields))
    _examples(root / package / "examples")
    return root


def _examples(folder: Path) -> None:
    """Two example inputs: a dark and a bright smooth gradient."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 40, 64)[None, :] + np.linspace(0, 20, 64)[:, None]
    for label, base in (("dark", 30), ("bright", 190)):
        Image.fromarray(np.repeat((base + ramp).astype(np.uint8)[..., None], 3, axis=2)).save(folder / f"{label}.png")
