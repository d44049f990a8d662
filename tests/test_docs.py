"""The docs cannot drift (issue 31): README.md is a front page, the documentation site builds
strictly, every documented command line of dxserve's own tools parses with the tool's real
parser (a wrong flag fails here), and the documented calls (the client's command lines, curl,
the Python snippets that call a server) run as written against a real server."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from conftest import FIXTURES, ROOT, ServerProcess, free_port, wait_serving

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "clients" / "python" / "README.md",
         *sorted((ROOT / "plugins").glob("*/README.md"))]
TOOLS = {"dxserve": "dxserve.cli", "dxserve-client": "dxserve_client.cli", "dxserve-lymphoblast": "dxserve_lymphoblast.cli"}
BIN = Path(sys.executable).parent
#: Documented client command lines not run here, and where what they show is tested instead.
NOT_RUN = {
    "--watch": "runs until stopped: tests/test_client_cli.py (watch)",
    "--tls-ca": "needs certificates: tests/test_security.py (TLS, mutual TLS)",
    "--ca-cert": "needs certificates: tests/test_security.py",
    "dx.example.org": "a remote host",
    "host:50051": "a remote host",
    "--plugin my_model": "a scaffolded plugin: tests/test_plugin_kit.py",
    "--model-version 2.1.0+taleqani.1": "a site version: tests/test_sites.py",
}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, and of each indented one as ("indented", body)."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if match := re.match(r"^\s*```(\w*)", lines[i]):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            blocks.append((match.group(1) or "text", "\n".join(lines[i + 1:end])))
            i = end + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append(("indented", "\n".join(line[4:] for line in lines[i:end]).strip("\n")))
            i = end
        else:
            i += 1
    return blocks


def command_lines(page: Path) -> list[str]:
    """The shell command lines of a page's shell and indented blocks, continuations joined, comments cut."""
    found = []
    for language, body in code_blocks(page.read_text()):
        if language not in ("indented", "sh", "bash", "console", "text"):
            continue
        for line in body.replace("\\\n", " ").split("\n"):
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def tool_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(tool, arguments) of each of dxserve's tools a command line runs (through &&, | and ;)."""
    out = []
    for part in re.split(r"\s*(?:&&|\|\||\||;)\s*", line):
        try:
            words = shlex.split(part.replace("[", " ").replace("]", " "))
        except ValueError:
            continue
        while words and re.match(r"^[A-Z_]+=", words[0]):  # DXSERVE_X=... before the command
            words = words[1:]
        if "&" in words:
            words = words[:words.index("&")]
        kept, skip = [], False
        for word in words:  # a redirection and its file are the shell's, not the tool's
            if skip or re.match(r"^\d?[<>]", word):
                skip = word in (">", ">>", "<", "2>", "1>")
                continue
            kept.append(word)
        words = kept
        if words and Path(words[0]).name in TOOLS:
            out.append((Path(words[0]).name, words[1:]))
    return out


class Parsed(Exception):
    pass


def documented() -> list[tuple[str, str, list[str]]]:
    return [(f"{page.relative_to(ROOT)}: {line}", tool, args) for page in PAGES for line in command_lines(page)
            for tool, args in tool_invocations(line)]


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
    assert "## Quick start" in readme and "## Where to go next" in readme


def test_the_docs_site_builds_strictly_with_every_page_in_it(tmp_path):
    import yaml

    def pages(nav) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, dict):
            return [p for v in nav.values() for p in pages(v)]
        return [p for item in nav for p in pages(item)]

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert sorted(pages(config["nav"])) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    built = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "open-inference" / "index.html").is_file()


def test_every_documented_command_of_our_tools_parses(monkeypatch):
    """Each dxserve, dxserve-client and dxserve-lymphoblast line in the docs, through the tool's own
    argparse parser (stopped once parsed): an unknown flag or subcommand fails here."""
    import importlib

    calls = documented()
    assert len(calls) >= 40 and {tool for _, tool, _ in calls} == set(TOOLS)
    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    wrong = []
    for where, tool, args in calls:
        try:
            importlib.import_module(TOOLS[tool]).main(args)
            wrong.append(f"{where} (ran without parsing)")
        except Parsed:
            pass
        except SystemExit as exit_:
            wrong.append(f"{where} (exit {exit_.code})")
    assert not wrong, "\n".join(wrong)


def test_a_wrong_flag_in_the_docs_would_fail(monkeypatch):
    """The check above can fail: a misspelt flag is caught."""
    import dxserve_client.cli

    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, a=None, n=None: (_ for _ in ()).throw(
        Parsed(parse(self, a, n))))
    with pytest.raises(SystemExit):
        dxserve_client.cli.main(["classify", "cells/", "--specimen", "x"])  # the flag is --specimen-id


@pytest.fixture(scope="module")
def documented_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    http = free_port()
    server = ServerProcess("--http-port", str(http), tmp=tmp)
    server.http = http
    try:
        wait_serving(server.address, [None, "lymphoblast", "smear-field"])
    except TimeoutError:
        server.stop()
        raise AssertionError("server did not start:\n" + server.logs()[-5000:]) from None
    yield server
    assert server.stop() == 0, server.logs()[-3000:]


@pytest.fixture
def workspace(tmp_path) -> Path:
    """What the snippets name: cell.png and cell.bmp, folders of cells (cells/, smear/, smear-17/, images/,
    smears/smear-1/), fields/ (the fixture fields), and the repository's tests/fixtures."""
    cells = sorted((FIXTURES / "cells").glob("*.png"))
    shutil.copy(cells[0], tmp_path / "cell.png")
    Image.open(cells[0]).save(tmp_path / "cell.bmp")
    for folder in ("cells", "smear", "smear-17", "images"):
        (tmp_path / folder).mkdir()
        for cell in cells:
            shutil.copy(cell, tmp_path / folder / cell.name)
    (tmp_path / "fields").mkdir()
    for field in sorted((FIXTURES / "fields").glob("*.jpg")):
        shutil.copy(field, tmp_path / "fields" / field.name)
    (tmp_path / "smears" / "smear-1").mkdir(parents=True)
    shutil.copy(cells[0], tmp_path / "smears" / "smear-1" / "a.png")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "fixtures").symlink_to(FIXTURES)
    return tmp_path


def at(text: str, server) -> str:
    return text.replace("localhost:50051", server.address).replace("localhost:8000", f"127.0.0.1:{server.http}")


def test_the_documented_client_lines_and_curl_run_as_written(documented_server, workspace):
    ran, skipped = [], []
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DXSERVE_SERVER": documented_server.address}
    for page in PAGES:
        assignments = []  # a block's `NAME=$(...)` lines, which its later lines use
        for line in command_lines(page):
            words = line.split()
            if re.match(r"^[A-Z_]+=\S", line) and len(words) == 1 or re.match(r"^[A-Z_]+=\$\(", line):
                assignments.append(line)
                continue
            runnable = words and (Path(words[0]).name == "dxserve-client" or words[0] == "curl")
            if not runnable:
                continue
            if reason := next((why for key, why in NOT_RUN.items() if key in line), None):
                skipped.append((line, reason))
                continue
            command = at(line.replace(".venv/bin/", ""), documented_server)
            if command.startswith("dxserve-client") and "--server" not in command:
                command = command.replace("dxserve-client", f"dxserve-client --server {documented_server.address}", 1)
            done = subprocess.run(["bash", "-c", "\n".join([*assignments, command])], cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{page.relative_to(ROOT)}: {line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            assert not command.startswith("curl") or '"error"' not in done.stdout, f"{line}\n{done.stdout[-2000:]}"
            ran.append(line)
    assert len(ran) >= 10, ran
    assert any("curl" in line for line in ran) and any("--fhir" in line for line in ran)


def test_the_documented_python_snippets_run_as_written(documented_server, workspace, triton_python):
    """Each Python block that calls a server: run with `paths` (the workspace's cells) defined; one
    that uses tritonclient with the Python of its own environment."""
    ran = 0
    for page in PAGES:
        for language, body in code_blocks(page.read_text()):
            if language != "python" or "Client(" not in body:
                continue
            script = workspace / f"snippet_{ran}.py"
            script.write_text("from pathlib import Path\npaths = sorted(Path('cells').glob('*.png'))\n" + at(body, documented_server))
            python = triton_python if "tritonclient" in body else sys.executable
            done = subprocess.run([python, str(script)], cwd=workspace, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{page.name}:\n{body}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 3
    assert (workspace / "bundle.json").is_file() and (workspace / "oru.hl7").is_file()  # hospital-integration.md's


def test_every_python_block_in_the_docs_is_python():
    """The blocks that are not calls against a server (a plugin's code, a pyproject's entry point
    in Python files) at least parse, so a typo in one fails here."""
    import ast

    blocks = [(page, body) for page in PAGES for language, body in code_blocks(page.read_text()) if language == "python"]
    assert len(blocks) >= 6
    for page, body in blocks:
        ast.parse(body, filename=str(page.relative_to(ROOT)))
