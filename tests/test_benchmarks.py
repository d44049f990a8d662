"""The benchmarks are scripts nothing else runs: each must still import (its helpers from
serving.py, the server's and the client's names) and have a `main`, so a refactor that breaks
one fails here, not the next time someone measures."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture
def benchmarks_path(monkeypatch):
    """benchmarks/ importable for one test; its modules (generic names: `load`, `serving`) forgotten after."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCHMARKS)):
            del sys.modules[name]


def test_every_benchmark_is_found():
    assert {"serving", "per_image", "profile_server", "load"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_and_has_main(name, benchmarks_path):
    module = importlib.import_module(name)
    assert callable(module.main)
    assert module.__doc__ and "python benchmarks/" in module.__doc__, "its docstring says how to run it"


def test_profile_server_reads_py_spy_raw_stacks(tmp_path, benchmarks_path):
    profile_server = importlib.import_module("profile_server")
    raw = tmp_path / "raw.txt"
    raw.write_text("thread (101): MainThread;run (asyncio/runners.py:190);Handle._run (asyncio/events.py:80) 7\n"
                   "thread (102): decode_1;Thread.run (threading.py:982);check (dxserve_lymphoblast/gate.py:199) 3\n")
    rows = profile_server.read_raw(raw)
    assert rows == [("MainThread", ["run (asyncio/runners.py:190)", "Handle._run (asyncio/events.py:80)"], 7),
                    ("decode_1", ["Thread.run (threading.py:982)", "check (dxserve_lymphoblast/gate.py:199)"], 3)]
