"""Deployment files: the Kubernetes manifests and the Dockerfile checked for what they must
have; the image built and its health check run only where a container engine answers."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import yaml

from conftest import ROOT, ServerProcess
from dxserve_client import Client

MANIFESTS = ROOT / "deploy" / "kubernetes" / "dxserve.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _documents() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("kind")
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _secrets_used(node) -> set[str]:
    """Names of the Secrets a manifest reads (secretKeyRef, secretRef, secret volumes)."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                found.add(value["name"])
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                found.add(value["secretName"])
            found |= _secrets_used(value)
    elif isinstance(node, list):
        for item in node:
            found |= _secrets_used(item)
    return found


def test_every_secret_the_manifests_read_is_created_in_the_docs():
    used = set().union(*(_secrets_used(doc) for doc in _documents().values()))
    assert used, "the Deployment reads its audit database URL from a Secret"
    readme = (ROOT / "docs" / "deployment.md").read_text()
    missing = [name for name in sorted(used) if f"kubectl create secret generic {name} " not in readme]
    assert not missing, f"Secrets mounted but never shown how to create in docs/deployment.md: {missing}"


def test_deployment_probes_resources_and_security():
    deployment = _documents()["Deployment", "dxserve"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 50051
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe  # native gRPC health probes
    assert container["readinessProbe"]["grpc"]["service"] == "dxserve.v1.DiagnosticsService/lymphoblast"
    assert container["livenessProbe"]["grpc"]["service"] == "dxserve.v1.Liveness"  # not restarted for an audit outage
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and container["securityContext"]["allowPrivilegeEscalation"] is False
    grace = int(container["args"][container["args"].index("--grace-period-s") + 1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace  # the server ends its streams before the kubelet kills it


def test_services_select_the_pods_and_one_is_headless():
    docs = _documents()
    labels = docs["Deployment", "dxserve"]["spec"]["template"]["metadata"]["labels"]
    for name in ("dxserve", "dxserve-headless"):
        service = docs["Service", name]
        assert service["spec"]["selector"].items() <= labels.items()
        assert any(p["targetPort"] == "grpc" and p["port"] == 50051 for p in service["spec"]["ports"])
    assert docs["Service", "dxserve-headless"]["spec"]["clusterIP"] == "None"


def test_dockerfile_is_slim_non_root_with_a_grpc_health_check():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM")][0]].startswith("FROM python:3.11-slim")
    user = [line for line in lines if line.startswith("USER")]
    assert user and user[-1] not in ("USER root", "USER 0")
    assert "HEALTHCHECK" in text and '"dxserve", "health"' in text
    assert 'ENTRYPOINT ["dxserve", "serve"]' in text
    for source in ("server", "plugins", "clients"):  # the package with the plugin's weights
        assert f"COPY {source} ./{source}" in lines


def test_health_command_is_what_the_container_runs(tmp_path):
    from dxserve.cli import main

    assert main(["health", "--address", "127.0.0.1:1", "--timeout", "0.5"]) == 1  # nobody there
    server = ServerProcess("--disabled-plugins", "lymphoblast", "--disabled-plugins", "flaky", tmp=tmp_path)
    try:
        with Client(server.address) as client:
            client.wait_until_serving("brightness", 60)
        assert main(["health", "--address", server.address]) == 0
        assert main(["health", "--address", server.address, "--service", "dxserve.v1.DiagnosticsService/brightness"]) == 0
    finally:
        assert server.stop() == 0


def test_round_robin_client_reaches_the_server_through_a_dns_name(tmp_path):
    server = ServerProcess("--disabled-plugins", "lymphoblast", "--disabled-plugins", "flaky", tmp=tmp_path)
    try:
        with Client(f"dns:///localhost:{server.port}", round_robin=True) as client:
            client.wait_until_serving("brightness", 60)
            assert client.classify(np.zeros((8, 8, 3), np.uint8), plugin="brightness").ok
    finally:
        assert server.stop() == 0


def _engine() -> str | None:
    for engine in ("docker", "podman"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True, timeout=20).returncode == 0:
            return engine
    return None


@pytest.mark.skipif(_engine() is None, reason="no container engine answers here (docker/podman info failed)")
def test_image_builds_and_reports_healthy():
    import time

    engine = _engine()
    subprocess.run([engine, "build", "-f", str(DOCKERFILE), "-t", "dxserve:test", str(ROOT)], check=True, timeout=1800)
    container = subprocess.run([engine, "run", "-d", "--rm", "dxserve:test"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([engine, "exec", container, "dxserve", "health"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the container never reported SERVING"
            time.sleep(2)
        user = subprocess.run([engine, "exec", container, "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert user == "10001"
    finally:
        subprocess.run([engine, "stop", container], capture_output=True)
