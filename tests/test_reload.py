"""Model versions pinned by hash, hot reload (SIGHUP and AdminService), rollback (issue 8, item 4)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time

import grpc
import numpy as np
import pytest

from dxserve.audit import open_store
from dxserve.auth import KeyFile
from dxserve.v1 import admin_pb2, admin_pb2_grpc
from dxserve_client import Client, DxServeError
from dxserve.v1 import diagnostics_pb2 as pb
from test_lifecycle import light_server

GREY = np.full((8, 8, 3), 120, np.uint8)  # mean 0.47: "dark" at threshold 0.5, "bright" at 0.3
BRIGHTNESS_2_0 = "cfa04032fe0f1f4b055a0aa8caa60cba2ac48d5dea6d29e4070c33d92c7c059b"


def add_version(folder, version: str, threshold: float, declared: str | None = None) -> str:
    """Weights built in the test: a brightness version with its own threshold; returns the hash."""
    weights = folder / f"{version}.json"
    weights.write_text(json.dumps({"threshold": threshold}))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / f"{version}.sha256").write_text(declared or digest)
    return digest


def wait_for_default(client: Client, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while next(p for p in client.list_plugins() if p.name == "brightness").default_model_version != version:
        assert time.monotonic() < deadline, f"brightness never defaulted to {version}"
        time.sleep(0.1)


@pytest.fixture
def setup(tmp_path):
    versions = tmp_path / "versions"
    versions.mkdir()
    keys = KeyFile.load(tmp_path / "callers.json")
    tokens = {"lab": keys.add("lab", []), "ops": keys.add("ops", [], admin=True)}
    keys.save()
    env = {"DXSERVE_BRIGHTNESS_VERSIONS": str(versions)}
    return versions, tokens, env, ("--auth-keys-file", str(tmp_path / "callers.json"))


def test_weights_pinned_by_hash_are_served_by_those_weights_or_refused(tmp_path, setup):
    versions, tokens, env, flags = setup
    with light_server(tmp_path, *flags, env=env) as server, Client(server.address, token=tokens["lab"]) as lab:
        assert lab.classify(GREY, plugin="brightness").weights_sha256 == BRIGHTNESS_2_0
        pinned = lab.stub.Classify(_request(weights_sha256=BRIGHTNESS_2_0.upper()), metadata=lab.metadata, timeout=10)
        assert pinned.model_version == "2.0"
        for extra in ({"weights_sha256": "ab" * 32}, {"weights_sha256": "ab" * 32, "model_version": "2.0"}):
            with pytest.raises(grpc.RpcError) as caught:
                lab.stub.Classify(_request(**extra), metadata=lab.metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "never answered by other weights" in caught.value.details()


def _request(**fields):
    from dxserve.v1 import diagnostics_pb2 as pb
    from dxserve_client.client import to_image

    return pb.ClassifyRequest(plugin="brightness", image=to_image(GREY), **fields)


def test_sighup_loads_a_new_version_and_admins_roll_back(tmp_path, setup):
    versions, tokens, env, flags = setup
    with light_server(tmp_path, *flags, env=env) as server:
        with Client(server.address, token=tokens["lab"]) as lab, Client(server.address, token=tokens["ops"]) as ops:
            assert lab.classify(GREY, plugin="brightness").top_label == "dark"
            new_hash = add_version(versions, "3.0", threshold=0.3)
            server.process.send_signal(signal.SIGHUP)
            wait_for_default(lab, "3.0")
            after = lab.classify(GREY, plugin="brightness")
            assert (after.model_version, after.weights_sha256, after.top_label) == ("3.0", new_hash, "bright")
            old = lab.stub.Classify(_request(weights_sha256=BRIGHTNESS_2_0), metadata=lab.metadata, timeout=10)
            assert old.model_version == "2.0" and old.top_label == "dark"  # the old weights still answer when pinned

            admin = admin_pb2_grpc.AdminServiceStub(ops.channel)
            with pytest.raises(grpc.RpcError) as caught:  # not an admin
                admin_pb2_grpc.AdminServiceStub(lab.channel).SetDefaultVersion(
                    admin_pb2.SetDefaultVersionRequest(plugin="brightness", model_version="2.0"), metadata=lab.metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            rollback = admin.SetDefaultVersion(admin_pb2.SetDefaultVersionRequest(plugin="brightness", model_version="2.0"),
                                               metadata=ops.metadata, timeout=10)
            assert (rollback.previous_default, rollback.default_model_version) == ("3.0", "2.0")
            assert lab.classify(GREY, plugin="brightness").model_version == "2.0"

            add_version(versions, "4.0", threshold=0.1, declared="0" * 64)  # its file does not match its hash
            report = admin.ReloadPlugins(admin_pb2.ReloadPluginsRequest(plugins=["brightness"]), metadata=ops.metadata, timeout=30)
            (brightness,) = report.plugins
            assert not brightness.ok and "refusing corrupt or altered weights" in brightness.error
            assert lab.classify(GREY, plugin="brightness").model_version == "2.0"  # still serving as before
            (listed,) = [p for p in lab.list_plugins() if p.name == "brightness"]
            states = {v.version: (pb.VersionState.Name(v.state), v.state_reason) for v in listed.model_versions}
            assert states["4.0"][0] == "VERSION_STATE_FAILED" and "refusing corrupt" in states["4.0"][1]  # it fails alone
            assert states["3.0"][0] == "VERSION_STATE_READY" and states["2.0"][0] == "VERSION_STATE_READY"
            with pytest.raises(DxServeError) as caught:
                lab.classify(GREY, plugin="brightness", model_version="4.0")
            assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "VERSION_FAILED")
            (versions / "4.0.json").unlink()
            admin.ReloadPlugins(admin_pb2.ReloadPluginsRequest(plugins=["brightness"]), metadata=ops.metadata, timeout=30)
            back = admin.SetDefaultVersion(admin_pb2.SetDefaultVersionRequest(plugin="brightness"), metadata=ops.metadata, timeout=10)
            assert back.default_model_version == "3.0"
            with pytest.raises(grpc.RpcError) as caught:
                admin.SetDefaultVersion(admin_pb2.SetDefaultVersionRequest(plugin="brightness", model_version="9.9"),
                                        metadata=ops.metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    events = [(r["event"], r["caller"], r["plugin"], r["model_version"]) for r in open_store(str(server.audit_path)).rows()
              if r["event"] != "classify"]
    assert ("reload", "signal:SIGHUP", "brightness", "3.0") in events
    assert ("default_version", "ops", "brightness", "2.0") in events and ("default_version", "ops", "brightness", "3.0") in events
    assert any(e[0] == "reload" and e[1] == "ops" for e in events)


def test_a_retired_version_finishes_its_calls_first():
    """A reload swaps versions at once; the replaced batcher stops only when its calls are answered."""
    from dxserve.batcher import Batcher
    from dxserve_testplugins.brightness import WEIGHTS, WEIGHTS_SHA256, BrightnessRuntime
    from dxserve import ModelVersion

    async def scenario():
        runtime = BrightnessRuntime(ModelVersion("2.0", WEIGHTS, WEIGHTS_SHA256))
        runtime.load()
        batcher = Batcher("brightness", runtime, 8, 0.001, 16)
        batcher.start()
        async with batcher.admit(wait=False):
            retiring = asyncio.ensure_future(batcher.retire(timeout_s=30))
            await asyncio.sleep(0.3)
            assert not retiring.done()  # waits for the call in flight
            result = await batcher.submit(np.full((8, 8, 3), 0.9, np.float32))
            assert result.probabilities[1] > 0.5
        await asyncio.wait_for(retiring, 5)

    asyncio.run(scenario())


def _versions(client: Client, plugin: str = "brightness") -> dict[str, tuple[str, str]]:
    listed = next(p for p in client.list_plugins() if p.name == plugin)
    return {v.version: (pb.VersionState.Name(v.state), v.state_reason) for v in listed.model_versions}


def _health(client: Client, plugin: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(client.channel).Check(
        health_pb2.HealthCheckRequest(service=f"dxserve.v1.DiagnosticsService/{plugin}"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_weights_file_corrupted_under_a_loaded_version_fails_that_version_alone(tmp_path):
    """Reload hashes loaded versions' files again: the damage is found now, not at the next
    restart, and it costs that version only; the default falls back only where allowed."""
    versions = tmp_path / "versions"
    versions.mkdir()
    env = {"DXSERVE_BRIGHTNESS_VERSIONS": str(versions)}
    add_version(versions, "3.0", threshold=0.3)
    with light_server(tmp_path, env=env) as server, Client(server.address) as client:
        assert client.classify(GREY, plugin="brightness").model_version == "3.0"
        (versions / "3.0.json").write_text(json.dumps({"threshold": 0.9}))  # the file changes under the loaded version
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _versions(client)["3.0"][0] != "VERSION_STATE_FAILED":
            assert time.monotonic() < deadline, "reload did not notice the damaged file"
            time.sleep(0.1)
        assert "refusing corrupt or altered weights" in _versions(client)["3.0"][1]
        assert _versions(client)["2.0"][0] == "VERSION_STATE_AVAILABLE"  # not loaded yet: it loads on first use
        with pytest.raises(DxServeError) as caught:  # the default is the damaged one, and no fallback was allowed
            client.classify(GREY, plugin="brightness")
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "VERSION_FAILED")
        assert _health(client, "brightness") == "NOT_SERVING"
        assert (_health(client, "brightness/3.0"), _health(client, "brightness/2.0")) == ("NOT_SERVING", "SERVING")
        assert client.classify(GREY, plugin="brightness", model_version="2.0").model_version == "2.0"  # the others serve
    assert '"plugin reloaded"' in server.logs() and '"failed": ["3.0"]' in server.logs()

    # At the next start the plugin is not FAILED as a whole; with default_fallback the newest healthy version takes over.
    with light_server(tmp_path, "--default-fallback", "true", env=env) as server, Client(server.address) as client:
        assert _versions(client)["3.0"][0] == "VERSION_STATE_FAILED"
        listed = next(p for p in client.list_plugins() if p.name == "brightness")
        assert listed.state == pb.PLUGIN_STATE_READY and listed.default_model_version == "2.0"
        assert client.classify(GREY, plugin="brightness").model_version == "2.0"
        assert _health(client, "brightness") == "SERVING"


def test_setting_a_default_while_the_plugin_loads_says_it_is_loading(tmp_path):
    """Issue 31: an admin who sets a default version while the plugin loads is told it is LOADING
    (UNAVAILABLE, retry), not "has no version '2.0' (has: )" as if the plugin had none."""
    from conftest import UNGATED
    from dxserve.auth import KeyFile
    from dxserve.testing.server import serving
    from dxserve_testplugins import slow

    keys = KeyFile(tmp_path / "callers.json")
    token = keys.add("ops", [], admin=True)
    keys.save()
    slow.RELEASE.clear()
    try:
        with serving(modules=("dxserve_testplugins.slow",), disabled_plugins=["lymphoblast", "flaky", "brightness"],
                     ungated_versions_allowed=UNGATED, auth_keys_file=keys.path) as client:
            admin = admin_pb2_grpc.AdminServiceStub(client.channel)
            with pytest.raises(grpc.RpcError) as caught:
                admin.SetDefaultVersion(admin_pb2.SetDefaultVersionRequest(plugin="slow", model_version="2.0"),
                                        metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading (LOADING)" in caught.value.details() and "has no version" not in caught.value.details()
            slow.RELEASE.set()
    finally:
        slow.RELEASE.clear()
