"""The plugin conformance suite: what the server expects of every plugin, checked against one.

    pytest --pyargs dxserve.testing.conformance --plugin NAME [--allow-ungated] [--examples DIR]
    dxserve plugin check NAME                                  # the same

The plugin is loaded in process the way the server loads it (its default model version), and
served once by a real server for the end-to-end check. Inputs are the runtime's `examples()`,
the images in ``--examples DIR``, or, when neither is given, synthetic images. A field plugin
(`PluginInfo.objects_plugin`) is checked for what it does, finding objects; the classification
checks are its objects plugin's own.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dxserve.batcher import shape_groups
from dxserve_client.client import image_files
from dxserve.runtime import INDETERMINATE, QUALITY_GATE, REQUIRED_SAFETY_CHECKS, ModelRuntime, sha256_of

#: Probabilities may differ this much between a batch of one and a larger batch (kernels differ).
TOLERANCE = 1e-4


def decoded(path: Path) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image file, as the server decodes it."""
    from dxserve.images import to_rgb
    from PIL import Image

    with Image.open(path) as image:
        return to_rgb(image)


@pytest.fixture(scope="module")
def version(dxserve_runtime_class):
    versions = list(dxserve_runtime_class.versions())
    assert versions, "versions() lists no model version"
    return versions[0]


@pytest.fixture(scope="module")
def runtime(dxserve_runtime_class, version) -> ModelRuntime:
    runtime = dxserve_runtime_class(version)  # the server checks the weights' SHA-256 first: a test of its own here
    runtime.load()
    return runtime


@pytest.fixture(scope="module")
def images(request, dxserve_runtime_class) -> list[np.ndarray]:
    folder = request.config.getoption("dxserve_examples")
    paths = image_files([Path(folder)]) if folder else list(dxserve_runtime_class.examples())
    if paths:
        return [decoded(Path(p)) for p in paths]
    side = max(dxserve_runtime_class.info.input.min_side, 64)
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, side, dtype=np.float32)
    return [np.stack([np.add.outer(smooth, smooth[::-1]) / 2] * 3, axis=-1).astype(np.uint8),
            rng.integers(0, 256, (side, side + 7, 3), dtype=np.uint8)]


@pytest.fixture
def classifies(dxserve_runtime_class) -> None:
    """Skips a classification check for a field plugin: its objects plugin answers for those."""
    if dxserve_runtime_class.info.objects_plugin:
        pytest.skip(f"a field plugin: {dxserve_runtime_class.info.objects_plugin!r} classifies its objects")


@pytest.fixture
def finds(dxserve_runtime_class) -> None:
    if not dxserve_runtime_class.info.objects_plugin:
        pytest.skip("not a field plugin")


def probabilities(runtime: ModelRuntime, images: list[np.ndarray]) -> np.ndarray:
    """What the server computes for a batch: preprocess each image, then one predict_with_issues
    per input shape (`batcher.shape_groups`)."""
    inputs = [runtime.preprocess(i) for i in images]
    out = np.zeros((len(images), len(runtime.info.labels)))
    for group in shape_groups(inputs):
        out[group] = np.asarray(runtime.predict_with_issues(np.stack([inputs[i] for i in group])).probabilities)
    return out


def test_declares_its_labels_and_versions(dxserve_runtime_class, dxserve_plugin):
    info = dxserve_runtime_class.info
    assert info.name == dxserve_plugin
    fewest = 1 if info.objects_plugin else 2  # a field plugin's label says it classified what it found
    assert len(info.labels) >= fewest and len(set(info.labels)) == len(info.labels), \
        f"labels must be {fewest} or more and distinct: {info.labels}"
    assert INDETERMINATE not in info.labels, f"{INDETERMINATE!r} is the server's word for no call, not a label"
    assert info.version and info.description and info.intended_use, "PluginInfo needs a version, description and intended use"
    names = [v.version for v in dxserve_runtime_class.versions()]
    assert names and len(set(names)) == len(names), f"model versions must be listed once each: {names}"


def test_every_weights_file_matches_its_sha256(dxserve_runtime_class):
    for v in dxserve_runtime_class.versions():
        assert Path(v.weights).is_file(), f"model version {v.version}: weights file {v.weights} is missing (package data not shipped?)"
        actual = sha256_of(Path(v.weights))
        assert actual == v.weights_sha256, (f"model version {v.version}: {v.weights} has SHA-256 {actual}, the version "
                                            f"declares {v.weights_sha256} (`dxserve weights-sha256 FILE` prints it)")
        assert v.model_card, f"model version {v.version} has no model card"


def test_the_default_version_has_the_safety_checks_the_server_requires(request, dxserve_runtime_class, version):
    missing = set(REQUIRED_SAFETY_CHECKS) - set(dxserve_runtime_class.safety_checks(version))
    if missing and request.config.getoption("dxserve_allow_ungated"):
        pytest.skip(f"version {version.version} lacks {sorted(missing)}: served only where the operator allows it")
    assert not missing, (f"the server will not serve version {version.version}: it lacks {sorted(missing)} (override "
                         "check_quality / predict_with_issues, or run with --allow-ungated for research plugins)")


def test_rows_are_probabilities_over_the_labels(runtime, images, classifies):
    p = probabilities(runtime, images)
    assert p.shape == (len(images), len(runtime.info.labels))
    assert np.all(np.isfinite(p)) and np.all(p >= 0) and np.all(p <= 1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_prepare_equals_preprocess_and_check_quality(runtime, images, classifies):
    """The server calls `prepare`; a plugin that overrides it to share work must not change either answer."""
    for image in images:
        model_input, issues = runtime.prepare(image)
        expected = runtime.preprocess(image)
        assert np.shape(model_input) == np.shape(expected) and np.asarray(model_input).dtype == np.asarray(expected).dtype
        same = (all(np.array_equal(model_input[f], expected[f]) for f in expected.dtype.names) if expected.dtype.names
                else np.array_equal(model_input, expected))
        assert same, "prepare(image)[0] differs from preprocess(image)"
        assert [i.code for i in issues] == [i.code for i in runtime.check_quality(image)], "prepare's issues differ from check_quality's"


def test_decide_never_contradicts_the_probabilities(runtime, images, classifies):
    for row in probabilities(runtime, images):
        decision = runtime.decide(row)
        assert decision.indeterminate == (decision.label == INDETERMINATE), decision
        if not decision.indeterminate:
            assert decision.label == runtime.info.labels[int(np.argmax(row))], f"called {decision.label} for {row}"


def test_same_answer_alone_and_inside_a_batch(runtime, images, classifies):
    together = probabilities(runtime, images)
    for i, image in enumerate(images):
        np.testing.assert_allclose(probabilities(runtime, [image])[0], together[i], atol=TOLERANCE)


def test_answers_are_deterministic(runtime, images, classifies):
    np.testing.assert_allclose(probabilities(runtime, images), probabilities(runtime, images), atol=TOLERANCE)


def test_thread_safe(runtime, images, classifies):
    expected = probabilities(runtime, images)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(probabilities(runtime, images))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, f"predict raised when called from 4 threads at once: {errors[0]!r}"
    for p in results:
        np.testing.assert_allclose(p, expected, atol=TOLERANCE)


def _blank_or_noise(runtime, kind: str) -> np.ndarray:
    """A flat light-grey image ("blank") or uniform RGB noise ("noise"), at least 256 px a side."""
    side = max(runtime.info.input.min_side, 256)
    if kind == "blank":
        return np.full((side, side, 3), 200, np.uint8)
    return np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_a_blank_or_noise_image_gets_no_confident_label(dxserve_runtime_class, runtime, version, kind, classifies):
    if QUALITY_GATE not in dxserve_runtime_class.safety_checks(version):
        pytest.skip("the plugin declares no quality gate")
    image = _blank_or_noise(runtime, kind)
    issues = list(runtime.check_quality(image))
    prediction = runtime.predict_with_issues(runtime.preprocess(image)[None])
    issues += list(prediction.issues[0])
    decision = runtime.decide(np.asarray(prediction.probabilities)[0])
    assert issues or decision.indeterminate, f"a {kind} image passed the quality gate and was called {decision.label}"


def test_explanations_have_the_image_shape(dxserve_runtime_class, runtime, images, classifies):
    if not dxserve_runtime_class.explains():
        pytest.skip("the plugin does not explain")
    image = images[0]
    explanation = runtime.explain(image)
    heatmap = np.asarray(explanation.heatmap)
    assert heatmap.shape == image.shape[:2], f"heatmap {heatmap.shape} for an image {image.shape[:2]}"
    assert np.all(np.isfinite(heatmap)) and heatmap.min() >= 0 and heatmap.max() <= 1
    assert explanation.label in runtime.info.labels and explanation.method


def test_a_field_plugin_finds_well_formed_objects(runtime, images, finds):
    """Each object's box lies in the image, its image is uint8 RGB, its mask the box's shape;
    the same image gives the same objects; a field with issues gives none."""
    for image in images:
        found, issues = runtime.find_objects(image)
        again, _ = runtime.find_objects(image)
        assert [o.box for o in found] == [o.box for o in again], "find_objects is not deterministic"
        assert not (found and issues), "a field with quality issues must give no objects (none is classified)"
        height, width = image.shape[:2]
        for o in found:
            x, y, w, h = (int(v) for v in o.box)
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height, f"box {o.box} outside {width}x{height}"
            crop = np.asarray(o.image)
            assert crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[2] == 3, f"object image {crop.dtype} {crop.shape}"
            assert o.mask is None or np.asarray(o.mask).shape == (h, w), f"mask {np.shape(o.mask)} for a box {w}x{h}"


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_a_field_plugin_refuses_a_blank_or_noise_field(dxserve_runtime_class, runtime, version, kind, finds):
    if QUALITY_GATE not in dxserve_runtime_class.safety_checks(version):
        pytest.skip("the plugin declares no quality gate")
    image = _blank_or_noise(runtime, kind)
    found, issues = runtime.find_objects(image)
    assert issues and not found, f"a {kind} field passed the field's gate with {len(found)} objects"


def test_served_end_to_end(dxserve_client, dxserve_plugin, dxserve_runtime_class, version, images):
    from dxserve_client.client import encode_png

    results = list(dxserve_client.classify_stream([encode_png(i) for i in images], plugin=dxserve_plugin))
    assert len(results) == len(images)
    for result in results:
        assert result.ok, f"the server answered {result.error_code}: {result.error_message}"
        assert result.model_version == version.version and result.weights_sha256 == version.weights_sha256
        if dxserve_runtime_class.info.objects_plugin:  # its objects, each answered (or refused) on its own
            assert result.field is not None and len(result.objects) == result.field.found
        else:
            assert abs(sum(result.probabilities.values()) - 1.0) < 1e-5
