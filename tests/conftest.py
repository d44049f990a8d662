"""Shared fixtures: a real server in a subprocess on a free loopback port, with the
lymphoblast plugin and the test plugins of tests/plugins/site installed next to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_SITE = ROOT / "tests" / "plugins" / "site"
# Every server a test starts picks its own ports: the HTTP door and metrics (on by default, on
# fixed ports) are off unless a test asks for them with --http-port / --metrics-port.
os.environ.setdefault("DXSERVE_HTTP_PORT", "0")
os.environ.setdefault("DXSERVE_METRICS_PORT", "0")
# The test plugins have no quality gate or out-of-distribution check: servers under test allow
# them explicitly, as an operator would for research (lymphoblast's ungated 1.x stay refused).
TEST_PLUGINS_UNGATED = "brightness/*,flaky/*,slow/*,hang/*,broken_load/*,tiles/*"
UNGATED = TEST_PLUGINS_UNGATED.split(",")
FIXTURES = ROOT / "tests" / "fixtures"
# The lymphoblast version a server serves when a request names none (the newest shipped),
# and the 2.x version before it, which stays loadable.
DEFAULT_VERSION, PREVIOUS_VERSION = "2.1.0", "2.0.0"

# In-process tests see the test plugins as installed too.
sys.path.insert(0, str(TEST_SITE))


def make_certificates(folder: Path, client_name: str = "lab-9") -> None:
    """With the openssl command: a CA (ca.pem), a server certificate for 127.0.0.1 (server.pem,
    server.key) and a client certificate with CN=`client_name` (client.pem, client.key)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    for name, extra in (("server", ["-addext", "subjectAltName=IP:127.0.0.1"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else client_name}", *extra)
        ext = ["-copy_extensions", "copy"] if name == "server" else []
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem",
            "-days", "2", *ext)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, plugins: list[str | None], timeout_s: float = 180.0, root_certificates: bytes | None = None,
                 client_certificate: tuple[bytes, bytes] | None = None) -> None:
    """Block until the server (None) and every named plugin answer SERVING in health."""
    from dxserve_client import Client

    with Client(address, root_certificates=root_certificates, client_certificate=client_certificate) as client:
        for plugin in plugins:
            client.wait_until_serving(plugin, timeout_s)


class ServerProcess:
    """`dxserve serve` in a subprocess; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, tmp: Path, port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self.audit_path = tmp / f"audit-{self.port}.sqlite3"
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TEST_SITE), os.environ.get("PYTHONPATH", "")]),
                       "TF_CPP_MIN_LOG_LEVEL": "2", "DXSERVE_AUDIT_DB": str(self.audit_path),
                       "DXSERVE_UNGATED_VERSIONS_ALLOWED": TEST_PLUGINS_UNGATED, **(env or {})}
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dxserve.cli", "serve", "--address", self.address, *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment,
        )

    def logs(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """One server for the session: lymphoblast, brightness, flaky, and two broken plugins."""
    proc = ServerProcess("--max-batch-wait-ms", "5", "--max-message-bytes", str(4 * 1024 * 1024),
                         "--max-image-pixels", "4000000", tmp=tmp_path_factory.mktemp("server"))
    try:
        wait_serving(proc.address, [None, "lymphoblast", "brightness"])
    except TimeoutError:
        proc.stop()
        raise AssertionError("server did not start:\n" + proc.logs()[-5000:]) from None
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited {code} on SIGTERM:\n{proc.logs()[-3000:]}"


@pytest.fixture
def client(server):
    from dxserve_client import Client

    with Client(server.address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="session")
def cell_paths() -> list[Path]:
    """The shipped sample cells (tests/fixtures/cells, with attribution)."""
    return sorted((FIXTURES / "cells").glob("*.png"))


def png_bytes(array: np.ndarray, **save_args) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


TRITONCLIENT = "tritonclient[grpc,http]==2.73.0"  # pins protobuf < 7: it lives in its own virtual environment


def once_per_run(tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once per test run: the first xdist worker to ask makes it under
    a lock while the others wait, then all of them share it (read it, or copy it to change it)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    shared.mkdir(exist_ok=True)
    with (shared.parent / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared.parent / f"{name}.made").exists():
            make(shared)
            (shared.parent / f"{name}.made").touch()
    return shared


@pytest.fixture(scope="session")
def triton_python(tmp_path_factory) -> str:
    """The Python of a fresh virtual environment holding tritonclient (from the package index),
    made once per test run."""
    def make(folder: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True)
        installed = subprocess.run([str(folder / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                                    "--disable-pip-version-check", TRITONCLIENT, "pillow==13.0.0"], capture_output=True, text=True)
        assert installed.returncode == 0, f"could not install {TRITONCLIENT}:\n{installed.stderr[-3000:]}"

    return str(once_per_run(tmp_path_factory, "tritonclient", make) / "venv" / "bin" / "python")
