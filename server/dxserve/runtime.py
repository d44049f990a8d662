"""What a plugin author implements: a `ModelRuntime` subclass, with `load()` and `predict()`.

The server does the rest: it decodes and validates images (to uint8 RGB arrays), batches
them, calls `preprocess` and `predict` off the event loop, turns exceptions into gRPC
errors, and reports state in ListPlugins and health.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import ClassVar, Sequence

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """What images the plugin accepts, on top of the server's own limits."""

    description: str
    min_side: int = 1
    #: Largest image (width x height) the plugin takes, below the server's `max_image_pixels`
    #: (0: the server's). Checked from the file's header before a pixel is decoded, so an image
    #: the plugin could only refuse never costs the memory of decoding and preparing it.
    max_pixels: int = 0


@dataclass(frozen=True)
class PluginInfo:
    """A plugin's identity, as ListPlugins shows it."""

    name: str
    version: str
    description: str
    labels: tuple[str, ...]
    input: InputSpec
    intended_use: str
    #: A field plugin names the plugin that classifies each object it finds (`find_objects`);
    #: empty for a plugin that classifies the whole image.
    objects_plugin: str = ""


@dataclass(frozen=True)
class ModelVersion:
    """One set of weights. `weights_sha256` is checked against the file before loading."""

    version: str
    weights: Path
    weights_sha256: str
    model_card: str = ""  # Markdown
    model_card_json: str = ""
    extra: dict = field(default_factory=dict, compare=False)  # plugin-specific (thresholds, ...)
    #: SHA-256 of the same model in the version's other served forms (e.g. its TensorFlow file
    #: beside the LiteRT export served now): a site version made while another form was served
    #: still names this version as its parent (`sites.py`).
    same_model_sha256: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The plugin's conclusion for one image."""

    label: str  # one of the labels, or INDETERMINATE
    indeterminate: bool
    reason: str
    #: The positive label's probability reaches the plugin's high-sensitivity screening
    #: threshold: a flag for review, not a call (see Decision.screen_positive in the proto).
    screen_positive: bool = False
    #: The versioned rule with its thresholds, in words.
    rule: str = ""


INDETERMINATE = "indeterminate"

#: The input safety checks a model version can apply to every image (`ModelRuntime.safety_checks`).
QUALITY_GATE = "quality_gate"  # `check_quality` refuses images the model should not classify
OUT_OF_DISTRIBUTION = "out_of_distribution"  # `predict_with_issues` flags inputs unlike the training data
#: What the server requires of a version before it serves it: a version lacking any of them is
#: not served (FAILED_PRECONDITION, state NOT_SERVED in ListPlugins) unless the operator lists it
#: in the `ungated_versions_allowed` setting, e.g. for research on an old version.
REQUIRED_SAFETY_CHECKS = (QUALITY_GATE, OUT_OF_DISTRIBUTION)


@dataclass(frozen=True)
class QualityIssue:
    """One reason an image fails a plugin's input quality gate (`ModelRuntime.check_quality`)."""

    code: str  # machine-readable, UPPER_SNAKE_CASE, e.g. "NO_CELL", "OUT_OF_FOCUS"
    message: str  # in words, with the measured value and the accepted range
    value: float = float("nan")  # the measured score
    accepted_min: float = float("-inf")  # the accepted range of the score, versioned with the model
    accepted_max: float = float("inf")


@dataclass(frozen=True)
class Prediction:
    """What `ModelRuntime.predict_with_issues` returns: the probabilities, and for each image
    the problems the model itself found (e.g. features unlike its training data)."""

    probabilities: np.ndarray  # (n, len(labels)), rows summing to 1
    issues: Sequence[Sequence[QualityIssue]]  # n lists; empty where the image is fine


@dataclass(frozen=True)
class SpecimenCounts:
    """What the server has counted for one specimen (one `specimen_id` in one stream), as
    `ModelRuntime.decide_specimen` receives it."""

    seen: int  # items answered, failed ones included
    failed: int  # items answered with an error
    passed_gate: int  # results that passed the quality gate
    indeterminate: int  # results with an indeterminate decision (failed gate included)
    called: dict[str, int]  # label -> cells called that label (every label present, maybe 0)

    @property
    def total_called(self) -> int:
        return sum(self.called.values())

    def fraction(self, label: str, confidence: float = 0.95) -> tuple[float, float, float]:
        """(fraction of called cells called `label`, Wilson score interval low, high); (0, 0, 1)
        when no cell was called."""
        n, k = self.total_called, self.called.get(label, 0)
        if n == 0:
            return 0.0, 0.0, 1.0
        return (k / n, *wilson_interval(k, n, confidence))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided Wilson score interval of `k` successes in `n` trials: what scipy's
    `binomtest(k, n).proportion_ci(confidence, method="wilson")` returns, with its formula
    (Newcombe 1998) in its order of operations, equal to it (tested). binomtest also computes
    an exact p-value, 0.3 ms a call, and a stream's running specimen summary needs two or three
    intervals per answered cell on the event loop: about 1 ms a cell, in series. The normal
    quantile is the standard library's (NormalDist), equal to scipy's ndtri to 1e-15."""
    p = k / n
    z = NormalDist().inv_cdf(0.5 + 0.5 * confidence)
    denom = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denom
    q = 1 - p
    delta = z / denom * math.sqrt(4 * n * p * q + z**2)
    return (0.0 if k == 0 else float(center - delta)), (1.0 if k == n else float(center + delta))


@dataclass(frozen=True)
class FoundObject:
    """One object a field plugin found (`ModelRuntime.find_objects`)."""

    box: tuple[int, int, int, int]  # x, y, width, height in the image's pixels
    image: np.ndarray  # uint8 RGB (H, W, 3): what the objects plugin classifies, e.g. the cell on black at its scale
    mask: np.ndarray | None = None  # bool (height, width) of the box: the object's pixels; None: the whole box


@dataclass(frozen=True)
class Explanation:
    """What `ModelRuntime.explain` returns: a heatmap over the image the request sent."""

    heatmap: np.ndarray  # float (H, W) of the image's height and width, in [0, 1]; 1: drove the score most
    label: str  # the label whose score it explains
    method: str  # how it was made, in words


@dataclass(frozen=True)
class LabelledImage:
    """One labelled image a site brings to `ModelRuntime.adapt`."""

    image: np.ndarray  # decoded uint8 RGB (H, W, 3)
    label: str  # one of the plugin's labels
    group: str  # the patient (or, without patient IDs, the block of images it came from): the unit of every split
    source: str = ""  # the file it came from, for the report


@dataclass(frozen=True)
class Adaptation:
    """What `ModelRuntime.adapt` wrote into its folder: a site version's weights and figures."""

    weights: str  # file name in the folder: verified by SHA-256 before every load, like a version's weights
    report: dict  # the validation report (the metrics the operator's acceptance criteria read, and the rest)
    card: dict = field(default_factory=dict)  # what the site version's card says beyond the platform's fields


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file: what ModelVersion.weights_sha256 must be."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRuntime:
    """Base class of a plugin's model; one instance serves one model version.

    Subclasses set `info` and `versions()`, and implement `load` and `predict`. They may
    override `preprocess` (default: the image as float32 in [0, 1]), `decide` (default:
    the most probable label), `check_quality` (default: no gate), `predict_with_issues`
    (default: `predict`, with no issues), `decide_specimen` (default: no specimen-level call)
    `explain` (default: none; the server answers explain requests UNIMPLEMENTED) and
    `examples` (default: none; sample inputs for `dxserve plugin check`) and `prepare` (default:
    `preprocess` and `check_quality`, one after the other; override to share work between them),
    and `adapt` (default: none; a site version for another laboratory, `dxserve site onboard`).

    A **field plugin** sets `info.objects_plugin` and implements `find_objects` instead of
    `predict`: it finds objects in an image (cells in a microscope field) and the server has
    the objects plugin classify each one, through that plugin's own batcher, gate, decision and
    audit trail (see `find_objects`).

    The server serves a version only when `safety_checks(version)` includes every one of
    `REQUIRED_SAFETY_CHECKS` (an input quality gate and an out-of-distribution check), unless
    the operator allows it explicitly (`ungated_versions_allowed`).
    """

    info: ClassVar[PluginInfo]
    #: Largest batch this model takes in one `predict` call (the server may send fewer).
    max_batch_size: ClassVar[int] = 32

    def __init__(self, version: ModelVersion):
        self.version = version
        #: Set by the server: whose turn it is on the model (requests' batches before background work).
        self.turns = None

    def background(self):
        """A context manager to wrap each model call of background work (the passes of an
        `explain`) in: the server then runs requests' batches first, and the background call
        waits for a gap between them. Keep each such call short (tens of milliseconds): a
        waiting batch waits for at most one. Outside a server: no effect."""
        import contextlib

        return self.turns.background() if self.turns is not None else contextlib.nullcontext()

    @classmethod
    def versions(cls) -> Sequence[ModelVersion]:
        """The model versions available, the default first."""
        raise NotImplementedError

    def load(self) -> None:
        """Load `self.version`'s weights. Raise to mark the plugin failed."""
        raise NotImplementedError

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> one model input. Runs in a worker thread, per image."""
        return image.astype(np.float32) / 255.0

    def check_quality(self, image: np.ndarray) -> Sequence[QualityIssue]:
        """Optional input quality gate: the reasons the decoded uint8 RGB image (H, W, 3) is
        not something this model should classify (blank, noise, several objects, out of
        focus, out of the training distribution, ...); empty when it passes. Runs in a worker
        thread, per image, before `preprocess`. The server still runs the model, but answers
        a failing image with an indeterminate decision and these reasons (ClassifyResponse.quality)."""
        return ()

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, Sequence[QualityIssue]]:
        """What the server calls per image, in a worker thread: (`preprocess(image)`,
        `check_quality(image)`). Override only to share work between the two (the lymphoblast
        plugin computes the cell's mask once for both); the result must equal the two calls'."""
        return self.preprocess(image), self.check_quality(image)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Stacked `preprocess` outputs -> probabilities (n, len(info.labels)), rows summing to 1."""
        raise NotImplementedError

    def predict_with_issues(self, batch: np.ndarray) -> Prediction:
        """Optional: the probabilities and, per image, the problems the model itself found
        (e.g. features unlike its training data), from one pass. The server calls this and
        answers an image with issues like one that failed `check_quality`. Default:
        `predict`, with no issues."""
        probabilities = self.predict(batch)
        return Prediction(probabilities, [()] * len(probabilities))

    def decide(self, probabilities: np.ndarray) -> Decision:
        """The decision for one image's probabilities; override for thresholds or abstention."""
        top = int(np.argmax(probabilities))
        return Decision(self.info.labels[top], False, "most probable label")

    def decide_specimen(self, counts: SpecimenCounts) -> Decision | None:
        """Optional: a call on a whole specimen from its cells' counts, e.g. "blast-like cells
        predominate", with the rule and its versioned thresholds (`Decision.rule`); an
        indeterminate Decision when the counts do not support a call. Decision support, not a
        diagnosis. Called in the event loop after each counted item: keep it cheap. Default:
        None (the plugin makes no specimen-level call; the server still reports the counts)."""
        return None

    def explain(self, image: np.ndarray) -> Explanation:
        """Optional: what drove the score for the decoded uint8 RGB image (H, W, 3), as an
        `Explanation` whose heatmap has the image's height and width (Grad-CAM, occlusion, ...).
        Runs in a worker thread, only for requests that set `explain`; wrap each of its model
        calls in `with self.background():` so that classification goes first. Default: not available."""
        raise NotImplementedError

    def find_objects(self, image: np.ndarray, microns_per_pixel: float = 0.0
                     ) -> tuple[Sequence[FoundObject], Sequence[QualityIssue]]:
        """Field plugins only (`info.objects_plugin` set): the objects in the decoded uint8 RGB
        image (H, W, 3), in reading order, each with the image the objects plugin should
        classify, and the field's own quality issues (out of focus, not a stained smear, ...;
        with issues the server classifies no object and answers the field indeterminate).
        `microns_per_pixel`: the image's pixel size when the request gave it (0: unknown;
        estimate it, e.g. from red cells). Runs in a worker thread, per image. The server
        refuses a field with more than `max_objects_per_field` objects (INVALID_ARGUMENT)."""
        raise NotImplementedError

    def adapt(self, labelled: Sequence[LabelledImage], unlabelled: Sequence[np.ndarray], folder: Path,
              prevalence: float | None = None) -> Adaptation:
        """Optional: a **site version** of this (loaded) version for one laboratory, from a few of
        its labelled images and many unlabelled ones (`dxserve site onboard`). Re-fit what
        depends on the lab (the quality gate's ranges, the out-of-distribution reference, the
        classifier's last stage or its normalisation statistics, calibration and thresholds;
        keep the parent unchanged where the report shows it ranks the lab's images best), write
        the weights into `folder` (one file: its SHA-256 is what every result carries, so put
        everything the site version computes with in it)
        and return them with a validation report: grouped cross-validation on `labelled` by
        `LabelledImage.group`, beside this version unadapted and trivial baselines in the same
        splits. The report's `acceptance` block carries the figures the operator's acceptance
        criteria read (`sites.SiteAcceptance`): `labelled`, `auroc`, `sensitivity_at_screen`,
        `ece`, `confidently_wrong`, `margin_over_colour_alone`. A **field plugin**'s `adapt`
        fits how it finds objects in the lab's fields (its scale, marks, gate); its `labelled`
        images are fields that show an object (label: its one label), and its `acceptance`
        block carries `labelled` and `fields_with_objects` (the share of them in which it finds
        one). `prevalence` (`--prevalence`, passed only when the operator declares one; onboarding
        refuses it for an `adapt` without the parameter): the share of the first label among the
        images the site will send; calibrate the probabilities to it, not to the labelled images' share
        (labelled half of each, they rank best), and read the report's calibration figures at it.
        The server serves the site version (`<version>+<site>.<n>`) only
        while they are met, and loads it with `load`, `self.version.extra["site"]` set to its
        site.json and `["parent"]` to this version's `ModelVersion` (`sites.py`).
        Runs offline, never in the server. Default: not available."""
        raise NotImplementedError

    @classmethod
    def adapts(cls) -> bool:
        """Whether this runtime overrides `adapt` (site versions can be made and served)."""
        return cls.adapt is not ModelRuntime.adapt

    @classmethod
    def examples(cls) -> Sequence[Path]:
        """Optional: a few image files (shipped with the plugin) of what it is meant to classify,
        for the conformance suite (`dxserve plugin check`) and for trying it out. Default: none
        (the suite then uses synthetic images)."""
        return ()

    @classmethod
    def safety_checks(cls, version: ModelVersion) -> frozenset[str]:
        """The input safety checks (`QUALITY_GATE`, `OUT_OF_DISTRIBUTION`) this runtime applies
        to every image under `version`. Override when they differ between versions (e.g. an
        old version without a gate). Default: QUALITY_GATE when `check_quality` is overridden,
        OUT_OF_DISTRIBUTION when `predict_with_issues` is."""
        checks = set()
        if cls.check_quality is not ModelRuntime.check_quality:
            checks.add(QUALITY_GATE)
        if cls.predict_with_issues is not ModelRuntime.predict_with_issues:
            checks.add(OUT_OF_DISTRIBUTION)
        return frozenset(checks)

    @classmethod
    def explains(cls) -> bool:
        """Whether this runtime overrides `explain`."""
        return cls.explain is not ModelRuntime.explain
