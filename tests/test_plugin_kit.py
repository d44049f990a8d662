"""The kit for plugin authors: the conformance suite on the shipped and test plugins and on a
plugin that breaks the rules, the scaffold from nothing to a served, tested plugin, and the
weights hash helper."""

import hashlib
import os
import subprocess
import sys

import pytest

from conftest import TEST_SITE


def dxserve(*args: str, cwd=None, pythonpath=(), timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(TEST_SITE)]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "dxserve.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("plugin, flags", [
    ("lymphoblast", ()),  # gated: every check runs, its explanation included
    ("brightness", ("--allow-ungated",)),
    ("flaky", ("--allow-ungated",)),
    ("hang", ("--allow-ungated", "--plugin-module", "dxserve_testplugins.hang")),  # a module, not an entry point
    ("smear-field", ()),  # a field plugin: its own checks, the classification ones skipped
])
def test_shipped_and_test_plugins_pass_the_conformance_suite(plugin, flags):
    run = dxserve("plugin", "check", plugin, *flags)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
    if plugin == "lymphoblast":  # gated and explaining: nothing skipped but the field plugins' checks
        skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
        assert skips and all("not a field plugin" in line for line in skips), run.stdout[-2000:]
    if plugin == "smear-field":  # a field plugin's own 7 checks ran (labels, hashes, safety, objects, blank, noise, served)
        assert "7 passed" in run.stdout, run.stdout[-2000:]


BROKEN = '''
import numpy as np
from dxserve import Decision, InputSpec, ModelRuntime, ModelVersion, PluginInfo, hookimpl
from pathlib import Path

WEIGHTS = Path(__file__).with_suffix(".weights")

class Broken(ModelRuntime):
    info = PluginInfo("broken", "0.1.0", "rule breaker", ("a", "b"), InputSpec("any"), "tests")
    @classmethod
    def versions(cls):
        return [ModelVersion("1", WEIGHTS, "0" * 64, model_card="card")]
    def load(self):
        self.calls = 0
    def preprocess(self, image):
        return np.array([image.mean() / 255.0], np.float32)
    def predict(self, batch):
        self.calls += 1
        p = batch[:, :1] + 0.01 * len(batch)  # depends on the batch; rows sum to 1.5
        return np.hstack([p, 1.5 - p])
    def decide(self, probabilities):
        low = int(np.argmin(probabilities))
        return Decision(self.info.labels[low], False, "the less probable label")

@hookimpl
def dxserve_model_runtimes():
    return [Broken]
'''


def test_the_suite_names_each_rule_a_plugin_breaks(tmp_path):
    (tmp_path / "broken_plugin.py").write_text(BROKEN)
    (tmp_path / "broken_plugin.weights").write_bytes(b"weights")
    run = dxserve("plugin", "check", "broken", "--allow-ungated", "--plugin-module", "broken_plugin", pythonpath=[tmp_path])
    assert run.returncode == 1
    failed = {line.split("::")[1].split()[0] for line in run.stdout.splitlines() if line.startswith("FAILED")}
    assert {"test_every_weights_file_matches_its_sha256", "test_rows_are_probabilities_over_the_labels",
            "test_decide_never_contradicts_the_probabilities", "test_same_answer_alone_and_inside_a_batch"} <= failed, run.stdout
    assert "dxserve weights-sha256 FILE" in run.stdout  # the fix is named


def test_an_unknown_plugin_is_named_as_not_installed():
    run = dxserve("plugin", "check", "no_such_plugin")
    assert run.returncode != 0 and "no plugin 'no_such_plugin' is installed" in run.stdout


def test_a_new_plugin_installs_serves_and_passes_its_own_tests(tmp_path):
    made = dxserve("plugin", "new", "demo_kit", "--directory", str(tmp_path))
    assert made.returncode == 0, made.stderr
    root = tmp_path / "demo_kit"
    assert (root / "dxserve_demo_kit" / "models" / "1.0.0" / "model.tflite").exists()  # the LiteRT pattern
    site = tmp_path / "site"  # installed as pip installs any package: a dist-info with its entry point
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(root)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert (site / "dxserve_demo_kit" / "models" / "1.0.0" / "model.tflite").exists()  # package data shipped
    env = {**os.environ, "PYTHONPATH": str(site)}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "13 passed, 4 skipped" in tests.stdout, tests.stdout[-2000:]  # the suite and its own test; no explanation, not a field plugin

    again = dxserve("plugin", "new", "demo_kit", "--directory", str(tmp_path))
    assert again.returncode == 2 and "not overwritten" in again.stderr
    bad = dxserve("plugin", "new", "Demo-Kit", "--directory", str(tmp_path))
    assert bad.returncode == 2 and "lower case" in bad.stderr


def test_weights_sha256_prints_what_a_model_version_declares(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"\x00weights" * 1000)
    run = dxserve("weights-sha256", str(weights))
    assert run.returncode == 0 and run.stdout.split()[0] == hashlib.sha256(weights.read_bytes()).hexdigest()
    missing = dxserve("weights-sha256", str(tmp_path / "nope.bin"))
    assert missing.returncode == 1 and "nope.bin" in missing.stderr


def test_the_scaffolds_placeholder_model_is_the_logistic_it_claims():
    """server/dxserve/scaffold_model.tflite (scripts/make_scaffold_model.py) on LiteRT: P(bright)
    = sigmoid(12 (brightness - 0.5)), rows summing to 1, at any batch size."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from dxserve.scaffold import PLACEHOLDER

    interpreter = Interpreter(model_path=str(PLACEHOLDER))
    source = interpreter.get_input_details()[0]
    x = np.linspace(0, 1, 7, dtype=np.float32)[:, None]
    interpreter.resize_tensor_input(source["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], x)
    interpreter.invoke()
    p = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-12 * (x[:, 0] - 0.5))), atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
