"""The three distributions: the client installs without the server or TensorFlow, the server
without TensorFlow, and each wheel holds what it must (the generated code once, the weights)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import DEFAULT_VERSION, PREVIOUS_VERSION, ROOT

CLIENT = ROOT / "clients" / "python"
HEAVY = ("tensorflow", "keras", "scikit-learn", "scipy", "matplotlib", "torch")


def requirements(pyproject: Path) -> list[str]:
    return [r.split("==")[0].split("[")[0].lower() for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def test_the_client_depends_on_no_server_and_no_framework():
    needs = requirements(CLIENT / "pyproject.toml")
    assert "dxserve" not in needs and not set(needs) & set(HEAVY), needs
    assert {"grpcio", "protobuf", "googleapis-common-protos", "grpcio-status"} <= set(needs)


def test_the_server_depends_on_no_framework():
    """Nor on SciPy (issue 30: 143 MB of a 590 MB serving install): serving uses none of it."""
    needs = requirements(ROOT / "pyproject.toml")
    assert "dxserve-client" in needs  # the generated code
    framework = {"tensorflow", "keras", "torch", "scipy"}
    assert not framework & set(needs), needs
    assert not framework & set(requirements(ROOT / "plugins" / "lymphoblast" / "pyproject.toml"))
    assert not framework & set(requirements(ROOT / "plugins" / "smear_field" / "pyproject.toml"))


def test_lymphoblast_serves_on_litert_and_trains_with_tensorflow():
    """Issue 30: a serving install of lymphoblast has LiteRT, not TensorFlow; training and the
    export are the `train` extra."""
    project = tomllib.loads((ROOT / "plugins" / "lymphoblast" / "pyproject.toml").read_text())["project"]
    assert "ai-edge-litert" in requirements(ROOT / "plugins" / "lymphoblast" / "pyproject.toml")
    assert {"tensorflow", "keras"} <= {r.split("==")[0] for r in project["optional-dependencies"]["train"]}


def test_serving_lymphoblast_imports_no_tensorflow():
    """Loading the default version and classifying a cell, as the server does (gate, model,
    calibration), imports neither TensorFlow, Keras nor SciPy (each import is refused in the child
    process)."""
    code = ("import sys, importlib.abc\n"
            "class NoFramework(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('tensorflow', 'keras', 'sklearn', 'matplotlib', 'scipy'):\n"
            "            raise ImportError(f'{name}: serving must not need it')\n"
            "sys.meta_path.insert(0, NoFramework())\n"
            "import numpy as np\n"
            "from dxserve_lymphoblast.plugin import LymphoblastRuntime, find_version\n"
            "from dxserve_lymphoblast.preprocess import input_dtype\n"
            "runtime = LymphoblastRuntime(find_version()); runtime.load()\n"
            "from PIL import Image\n"
            f"cell = np.asarray(Image.open({str(sorted((ROOT / 'tests' / 'fixtures' / 'cells').glob('*.png'))[0])!r}).convert('RGB'))\n"
            "model_input, issues = runtime.prepare(cell)\n"
            "assert runtime.predict_with_issues(np.stack([model_input])).probabilities.shape == (1, 2)\n"
            "print(runtime.version.weights.name, runtime.predict(np.zeros(3, input_dtype(runtime.image_size))).shape)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in __import__("os").environ.items() if k != "DXSERVE_LYMPHOBLAST_RUNTIME"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["model.tflite", "(3,", "2)"]


def test_client_code_imports_nothing_of_the_server():
    for source in (CLIENT / "dxserve_client").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert not (name == "dxserve" or name.startswith("dxserve.")) or name.startswith("dxserve.v1"), \
                    f"{source.relative_to(ROOT)} imports {name}: a client never imports the server"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    for project in (CLIENT, ROOT, ROOT / "plugins" / "lymphoblast", ROOT / "plugins" / "smear_field"):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(project)],
                       check=True, capture_output=True, timeout=300)
    return {w.name.split("-")[0]: w for w in out.glob("*.whl")}


def test_each_wheel_holds_its_own_part(wheels):
    client = zipfile.ZipFile(wheels["dxserve_client"]).namelist()
    server = zipfile.ZipFile(wheels["dxserve"]).namelist()
    plugin = zipfile.ZipFile(wheels["dxserve_lymphoblast"]).namelist()
    assert "dxserve/v1/diagnostics_pb2.py" in client and "dxserve/__init__.py" not in client  # a namespace the server shares
    assert not any(n.startswith("dxserve/v1/") for n in server) and "dxserve/app.py" in server  # the generated code once
    assert "dxserve/testing/conformance.py" in server
    assert {f"dxserve_lymphoblast/models/{v}/{f}" for v in (DEFAULT_VERSION, PREVIOUS_VERSION) for f in ("model.keras", "model.tflite", "ood.npz")} <= set(plugin)
    assert "dxserve_lymphoblast/examples/ATTRIBUTION.md" in plugin
    assert "dxserve/oip/grpc_service_pb2.py" in client  # the Open Inference Protocol's code, for callers too
    field = zipfile.ZipFile(wheels["dxserve_smear_field"]).namelist()
    assert {"dxserve_smear_field/detector/1.0.0/parameters.json", "dxserve_smear_field/detector/1.0.0/MODEL_CARD.md",
            "dxserve_smear_field/examples/ATTRIBUTION.md"} <= set(field)


def test_the_client_wheel_alone_classifies_against_a_server(wheels, server, tmp_path, cell_paths):
    """The client wheel's files alone (no server package on the path) list and classify."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheels["dxserve_client"]).extractall(site)
    # Only the client's files and its third-party dependencies: the server's dxserve is hidden.
    hidden = [str(ROOT / "server"), str(ROOT / "clients" / "python"), str(ROOT), ""]
    code = (f"import sys; sys.path = [{str(site)!r}] + [p for p in sys.path if p not in {hidden!r}]\n"
            "import importlib.abc\n"
            "class NoServer(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.startswith('dxserve.') and not name.startswith('dxserve.v1') or name.startswith('dxserve_lymphoblast'):\n"
            "            raise ImportError(f'{name}: the client must not need it')\n"
            "sys.meta_path.insert(0, NoServer())\n"
            "from dxserve_client.cli import main\n"
            f"sys.exit(main(['--server', {server.address!r}, 'classify', {str(cell_paths[0])!r}, '--quiet', '--format', 'jsonl']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f'"model_version": "{DEFAULT_VERSION}"' in run.stdout
    assert f"{site}/dxserve_client" in subprocess.run([sys.executable, "-c", code.split("from dxserve_client")[0] +
                                                       "import dxserve_client; print(dxserve_client.__file__)"],
                                                      capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout
