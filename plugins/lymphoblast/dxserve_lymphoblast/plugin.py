"""The dxserve plugin: registered through the `dxserve` entry-point group like any other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dxserve import (OUT_OF_DISTRIBUTION, QUALITY_GATE, Adaptation, Decision, Explanation, InputSpec, ModelRuntime, ModelVersion, PluginInfo,
                     Prediction, QualityIssue, SpecimenCounts, hookimpl)
from dxserve.runtime import INDETERMINATE

from .calibration import Thresholds, calibrated
from .card import CARD_FILE, CARD_MARKDOWN, WEIGHTS_FILE, INTENDED_USE
from .gate import check
from .ood import issues as ood_issues
from .ood import load as load_ood
from .preprocess import foreground_mask, input_dtype, model_input, to_image_coordinates
from .specimen import SpecimenRule

MODELS_DIR = Path(__file__).parent / "models"
PLUGIN_VERSION = "1.1.0"
# The model's single logit is for "lymphoblast"; "normal" is its complement.
LABELS = ("lymphoblast", "normal")
#: Which runtime serves a version whose card has a LiteRT export (`litert` in the card):
#: "litert" (the default: XNNPACK on the CPU, no TensorFlow) or "tensorflow" (the Keras model
#: as a frozen graph, e.g. on a GPU host; needs `dxserve-lymphoblast[train]`). Versions without
#: an export (1.x) are served by TensorFlow either way.
RUNTIME_ENV = "DXSERVE_LYMPHOBLAST_RUNTIME"
RUNTIMES = ("litert", "tensorflow")


def chosen_runtime() -> str:
    """The runtime named by DXSERVE_LYMPHOBLAST_RUNTIME (default "litert"); another name is a ValueError."""
    name = os.environ.get(RUNTIME_ENV, "litert").strip().lower() or "litert"
    if name not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV}={name!r}: expected one of {', '.join(RUNTIMES)}")
    return name


def _version_key(name: str) -> tuple:
    """Order of versions, oldest first: '1.10.0' after '1.9.0', and a suffixed name (a
    pre-release '2.0.0-rc1', or a serving variant '2.0.0-tta8') before its plain release,
    so the plain release is the newest and the default."""
    base, _, suffix = name.partition("-")
    numbers = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in base.split("."))
    return numbers, 0 if suffix else 1, suffix


def shipped_versions(models_dir: Path = MODELS_DIR, runtime: str | None = None) -> list[ModelVersion]:
    """Every models/<version>/ with weights and a card, newest first. A version served on
    LiteRT (`runtime`, default `chosen_runtime()`) names its `model.tflite` as its weights, so
    the server verifies that file's SHA-256 and every result names the file that produced it."""
    runtime = runtime or chosen_runtime()
    versions = []
    for folder in sorted((d for d in models_dir.iterdir() if (d / CARD_FILE).exists()), key=lambda d: _version_key(d.name), reverse=True):
        card_json = (folder / CARD_FILE).read_text()
        card = json.loads(card_json)
        markdown = folder / CARD_MARKDOWN
        served = card["litert"] if runtime == "litert" and "litert" in card else card["weights"]
        forms = [card["weights"]] + ([card["litert"]] if "litert" in card else [])
        versions.append(ModelVersion(
            version=card["version"],
            weights=(folder / served.get("file", WEIGHTS_FILE)).resolve(),
            weights_sha256=served["sha256"],
            model_card=markdown.read_text() if markdown.exists() else "",
            model_card_json=card_json,
            extra={"card": card, "folder": folder, "runtime": "litert" if served is card.get("litert") else "tensorflow"},
            same_model_sha256=tuple(form["sha256"] for form in forms if form is not served),  # a site made on either runtime
        ))
    return versions


def find_version(name: str = "", models_dir: Path = MODELS_DIR) -> ModelVersion | None:
    """The shipped version called `name`, or the default (newest) one; None if there is none."""
    versions = shipped_versions(models_dir)
    return next((v for v in versions if v.version == name), None) if name else next(iter(versions), None)


def averaged_over_views(model, views: int = 8):
    """Test-time averaging: the model's logit averaged over the first `views` of the cell's 8
    orientations (4 rotations, then the same mirrored; cells have no orientation), run as
    one batch of views x n. The order matches `features.view`, which training used."""
    import tensorflow as tf

    def forward(inputs):
        cell, n = inputs["cell"], tf.shape(inputs["cell"])[0]
        orientations = [tf.image.rot90(c, k) for c in (cell, tf.image.flip_left_right(cell)) for k in range(4)][:views]
        outputs = model({"cell": tf.concat(orientations, 0), "log_diameter": tf.tile(inputs["log_diameter"], [views, 1])},
                        training=False)
        return tf.nest.map_structure(lambda out: tf.reduce_mean(tf.reshape(out, (views, n, -1)), axis=0), outputs)

    return forward


def frozen(function):
    """`function` (a tf.function of one dict of tensors, with its input signature) as a graph
    whose variables are constants: TensorFlow's graph optimiser can then fold each batch norm
    into its convolution and fuse them, which it cannot do while the weights are variables.
    MobileNet at batch 32 on 2 cores: 1.2-1.4x the throughput of the same tf.function, logits
    equal to 4e-5 (probabilities to 1e-5; tested against the unfrozen function). The served
    model's weights are never trained in the server, so nothing is lost by freezing them.
    (`convert_variables_to_constants_v2` is TensorFlow's own freezing, as its converters use it;
    it lives in `tensorflow.python`, so the pinned TensorFlow and the test guard it.)"""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = function.get_concrete_function()
    graph = convert_variables_to_constants_v2(concrete)
    names = sorted(concrete.structured_input_signature[0][0])  # a dict's tensors flatten in key order
    # The outputs' nesting only: the traced tensors themselves would keep the unfrozen graph alive.
    structure = tf.nest.map_structure(lambda _: None, concrete.structured_outputs)

    def call(inputs):
        outputs = graph(*(tf.convert_to_tensor(inputs[name]) for name in names))
        return tf.nest.pack_sequence_as(structure, outputs)  # the function's own structure

    return call


class LymphoblastRuntime(ModelRuntime):
    """Keras CNN + MLP, served on LiteRT (or TensorFlow: `RUNTIME_ENV`); calibrated by
    temperature; decides with the card's thresholds.
    A version whose card says `input.views: k` averages the logit over k orientations, and
    one with `input.window: w` sees a w px square of the canvas around the cell (3.x)."""

    info = PluginInfo(
        name="lymphoblast",
        version=PLUGIN_VERSION,
        description="Leukemic B-lymphoblast (acute lymphoblastic leukemia) vs normal B-lymphoid precursor, "
        "from one segmented white-blood-cell image",
        labels=LABELS,
        input=InputSpec(
            description="One segmented white blood cell on a black background, RGB, any canvas size, at the C-NMC "
            "magnification (cells roughly 100-300 px across; the cell's size is an input of the model); the plugin "
            "crops, pads, resizes and colour-normalises it; a whole smear field goes to smear-field",
            min_side=16,
            # One cell at the C-NMC scale fits 2000 x 2000 px many times over; a larger image is
            # refused from its header (its gate alone took 1.1 GB on a white 25 Mpx one, issue 32).
            max_pixels=4_000_000,
        ),
        intended_use=INTENDED_USE,
    )
    max_batch_size = 64

    @classmethod
    def versions(cls) -> list[ModelVersion]:
        return shipped_versions()

    @classmethod
    def examples(cls) -> list[Path]:
        """A blast and a normal cell from C-NMC 2019 (examples/ATTRIBUTION.md)."""
        return sorted((Path(__file__).parent / "examples").glob("*.png"))

    @classmethod
    def safety_checks(cls, version: ModelVersion) -> frozenset[str]:
        """What the version's card gives it: 2.x has a quality gate and an out-of-distribution
        model; 1.x has neither, so the server does not serve it unless an operator allows it."""
        card = version.extra["card"]
        return frozenset(name for name, key in ((QUALITY_GATE, "quality_gate"), (OUT_OF_DISTRIBUTION, "ood")) if key in card)

    def load(self) -> None:
        site, parent = self.version.extra.get("site"), self.version.extra.get("parent")
        if site is not None:  # a site version (dxserve.sites): the parent's CNN, the site's head, gate and OOD
            return self._load_site(site, parent)
        card = self.version.extra["card"]
        self.gate = card.get("quality_gate")
        self.site_head = None
        self.image_size = int(card["input"]["image_size"])
        self.window = int(card["input"].get("window", 0))  # 3.x: a fixed square of the canvas; 2.x: the cell's box
        self.temperature = float(card["calibration"]["temperature"])
        self.thresholds = Thresholds(**card["thresholds"])
        self.views = int(card["input"].get("views", 1))
        self.specimen_rule = SpecimenRule(**card["specimen"]["rule"]) if "specimen" in card else None
        self.ood = load_ood(self.version.extra["folder"], card["ood"]) if "ood" in card else None
        if self.version.extra.get("runtime") == "litert":
            from .litert import LiteRTModel

            self._litert = LiteRTModel(self.version.weights, self.views)
        else:
            self._load_tensorflow()
        self.predict(np.zeros(1, input_dtype(self.image_size)))  # build graphs now, not on the first request

    def _load_site(self, site: dict, parent: ModelVersion) -> None:
        """A site version: its parent loaded as itself (its weights verified by hash first), then
        the site's CNN graph (the parent's weights, the site's batch-norm statistics; a site made
        before it had one uses the parent's), head, calibration, thresholds, gate and
        out-of-distribution reference."""
        from dxserve.runtime import sha256_of

        if sha256_of(parent.weights) != parent.weights_sha256:
            raise RuntimeError(f"parent {parent.version}'s weights {parent.weights.name} do not match their SHA-256")
        base = LymphoblastRuntime(parent)
        base.load()
        self.__dict__.update({k: v for k, v in base.__dict__.items() if k not in ("version", "turns")})
        folder = self.version.extra["site_folder"]
        with np.load(self.version.weights) as stored:
            self.site_head = {key: stored[key].astype(np.float64) for key in stored.files if key != "graph"}
            graph = stored["graph"].tobytes() if "graph" in stored.files else None
        if graph is not None:  # the site's own batch-norm statistics (adaptation.py): its graph, whichever runtime serves the parent
            from .litert import LiteRTModel

            self._litert = LiteRTModel(graph, self.views)
        self.gate = site["quality_gate"]
        self.ood = load_ood(folder, site["ood"])
        self.thresholds = Thresholds(**site["thresholds"])

    def adapt(self, labelled, unlabelled, folder: Path, prevalence: float | None = None) -> Adaptation:
        """A site version (`adaptation.py`): the CNN's batch-norm statistics, the gate's colour model,
        the OOD reference, a head on the CNN features, Platt calibration (to `prevalence`, else the
        labelled share) and thresholds, refitted on the site's cells."""
        try:  # the training stack: scikit-learn for the head, TensorFlow to convert the site's graph
            import keras  # noqa: F401
            import sklearn  # noqa: F401

            from .adaptation import adapt
        except ImportError as error:
            raise ImportError(f"onboarding a lymphoblast site needs the plugin's training extra "
                              f"(pip install 'dxserve-lymphoblast[train]'): {error}") from error
        return adapt(self, list(labelled), list(unlabelled), folder, prevalence)

    def _load_tensorflow(self) -> None:
        """The Keras model as a frozen TensorFlow graph (`frozen`), views averaged in the graph."""
        try:
            import keras
            import tensorflow as tf
        except ImportError as error:
            raise RuntimeError(f"model version {self.version.version} is served by TensorFlow here, which is not installed "
                               "(pip install 'dxserve-lymphoblast[train]'), or serve its LiteRT export "
                               f"({RUNTIME_ENV}=litert)") from error

        from . import model as _registers_custom_layers  # noqa: F401

        self._litert = None
        self.model = keras.models.load_model(self.version.weights, compile=False)
        if self.ood is not None:  # the model also returns its CNN features, for the out-of-distribution score
            self.model = keras.Model(self.model.inputs, [self.model.output, self.model.get_layer("features").output])
        # One traced graph for every batch size: 1.7x faster than eager calls at batch 32, 5x at 1.
        size = self.image_size
        signature = {"cell": tf.TensorSpec((None, size, size, 3), tf.uint8), "log_diameter": tf.TensorSpec((None, 1), tf.float32)}
        forward = averaged_over_views(self.model, self.views) if self.views > 1 else (lambda inputs: self.model(inputs, training=False))

        def scaled(inputs):  # uint8 records -> the model's [0, 1] floats, as preprocess.prepare scales them
            return forward({"cell": tf.cast(inputs["cell"], tf.float32) / 255.0, "log_diameter": inputs["log_diameter"]})

        self._forward = frozen(tf.function(scaled, input_signature=[signature], autograph=False))

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return model_input(image, self.image_size, window=self.window)

    def check_quality(self, image: np.ndarray, mask: np.ndarray | None = None) -> list[QualityIssue]:
        """The card's input quality gate (`gate.py`); versions without one (1.x) pass everything.
        `mask`: the image's `foreground_mask`, when the caller has it."""
        return check(image, self.gate, mask) if self.gate else []

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, list[QualityIssue]]:
        """`preprocess` and `check_quality` with the cell's foreground mask computed once for both."""
        mask = foreground_mask(image)
        return model_input(image, self.image_size, mask, self.window), self.check_quality(image, mask)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """batch: stacked `model_input` records (the cell image and its log diameter)."""
        return self.predict_with_issues(batch).probabilities

    def predict_with_issues(self, batch: np.ndarray) -> Prediction:
        """The probabilities and, for versions with an out-of-distribution model (the card's
        `ood`, 2.x), each image's OUT_OF_DISTRIBUTION issue, from one forward pass."""
        if self.site_head is not None:
            from .adaptation import design, head_logit

            logits, features = self._run_with_features(batch)
            a, b = self.site_head["platt"]
            if "coef" in self.site_head:  # a site head; without one, the parent's own logit, calibrated for the site
                logits = head_logit(self.site_head, design(features.astype(np.float64), batch["log_diameter"].astype(np.float64)))
            p_blast = 1.0 / (1.0 + np.exp(-(a * logits.astype(np.float64) + b)))
        else:
            logits, features = self._run(batch)
            p_blast = calibrated(logits, self.temperature)
        issues = ood_issues(features, self.ood) if self.ood else [[] for _ in logits]
        return Prediction(np.stack([p_blast, 1.0 - p_blast], axis=1), issues)

    def _run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The parent model's logits (n,) and CNN features (n, d) of stacked `model_input` records."""
        if self._litert is not None:
            return self._litert(batch["cell"], batch["log_diameter"])
        logits, features = self._run(batch)
        if features is None:
            raise RuntimeError(f"version {self.version.version} has no CNN features output (no OOD model)")
        return logits, features

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The served logits (n,) of stacked `model_input` records, and the CNN features when the version has an OOD model."""
        if self._litert is not None:
            logits, features = self._litert(batch["cell"], batch["log_diameter"])
            return logits, (features if self.ood else None)
        outputs = self._forward({"cell": batch["cell"], "log_diameter": batch["log_diameter"][:, None]})
        return (outputs[0].numpy()[:, 0], outputs[1].numpy()) if self.ood else (outputs.numpy()[:, 0], None)

    def decide(self, probabilities: np.ndarray) -> Decision:
        p = float(probabilities[0])
        t = self.thresholds
        call = int(t.decide(np.array([p]))[0])
        screen = bool(t.screen(np.array([p]))[0])
        rule = f"{t.describe()} (model {self.version.version})"
        flag = "; screen-positive: review" if screen else ""
        if call == 1:
            return Decision("lymphoblast", False, f"P(lymphoblast) {p:.3f} >= {max(t.upper, 0.5):.3f}{flag}", screen, rule)
        if call == 0:
            return Decision("normal", False, f"P(lymphoblast) {p:.3f} < {min(t.lower, 0.5):.3f}{flag}", screen, rule)
        return Decision(INDETERMINATE, True, f"P(lymphoblast) {p:.3f} lies in the indeterminate band "
                        f"[{min(t.lower, 0.5):.3f}, {max(t.upper, 0.5):.3f}){flag}: review by a person", screen, rule)


    def decide_specimen(self, counts: SpecimenCounts) -> Decision | None:
        """The card's specimen rule (`specimen.py`) on the blast fraction; None for versions without one (1.x)."""
        return self.specimen_rule.decide(counts, self.version.version) if self.specimen_rule else None

    def explain(self, image: np.ndarray) -> Explanation:
        """An occlusion map (`explain.py`) of the served logit for the most probable label."""
        from .explain import METHOD, occlusion_map

        record = self.preprocess(image)
        with self.background():
            logit = self._run(record[None])[0][0]
        label = LABELS[0] if logit >= 0 else LABELS[1]  # calibration keeps the sign: P >= 0.5 iff logit >= 0

        def logits(batch):  # each pass in a gap between the server's batches
            with self.background():
                return self._run(batch)[0]

        square = occlusion_map(logits, record, 1.0 if label == LABELS[0] else -1.0)
        return Explanation(to_image_coordinates(square, image, self.window), label, METHOD.format(size=self.image_size))


@hookimpl
def dxserve_model_runtimes() -> list[type[ModelRuntime]]:
    return [LymphoblastRuntime]
