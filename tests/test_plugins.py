"""Plugin discovery and loading, in process: entry points, loading state, bad weights."""

import asyncio

import grpc
import pytest

from conftest import UNGATED
from dxserve.app import Server
from dxserve.config import Settings
from dxserve.registry import FAILED, LOADING, discover
from dxserve.v1 import diagnostics_pb2 as pb
from dxserve.v1 import diagnostics_pb2_grpc as pb_grpc

ONLY_TEST_PLUGINS = ["lymphoblast"]  # keep TensorFlow out of these in-process tests


def test_entry_point_plugins_are_discovered_without_server_changes():
    plugins = discover(Settings(ungated_versions_allowed=UNGATED, disabled_plugins=ONLY_TEST_PLUGINS))
    assert {"brightness", "flaky", "broken_load"} <= set(plugins)
    assert plugins["brightness"].state == LOADING
    assert plugins["broken_import"].state == FAILED
    assert "No module named 'dxserve_no_such_dependency'" in plugins["broken_import"].reason


def test_lymphoblast_registers_through_the_entry_point_group():
    import importlib.metadata

    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dxserve")}
    assert names["lymphoblast"] == "dxserve_lymphoblast.plugin"


def test_disabled_plugins_are_not_loaded():
    plugins = discover(Settings(ungated_versions_allowed=UNGATED, disabled_plugins=ONLY_TEST_PLUGINS + ["flaky"]))
    assert "flaky" not in plugins and "lymphoblast" not in plugins


def test_weights_with_a_wrong_hash_fail_the_plugin(monkeypatch):
    from dxserve_testplugins import brightness

    monkeypatch.setattr(brightness, "WEIGHTS_SHA256", "0" * 64)
    plugins = discover(Settings(ungated_versions_allowed=UNGATED, disabled_plugins=ONLY_TEST_PLUGINS))

    async def load():
        from dxserve.registry import load_all

        async def ignore(entry):
            pass

        await load_all({"brightness": plugins["brightness"]}, Settings(ungated_versions_allowed=UNGATED, ), ignore)

    asyncio.run(load())
    assert plugins["brightness"].state == FAILED
    assert "refusing corrupt or altered weights" in plugins["brightness"].reason


def test_a_loaded_version_gives_back_the_memory_its_load_freed(monkeypatch):
    """Once a version's `load` returns, and before it takes traffic, the server hands the heap
    pages loading freed back to the system (`dxserve.heap`)."""
    from dxserve import heap, registry

    entry = discover(Settings(ungated_versions_allowed=UNGATED, disabled_plugins=ONLY_TEST_PLUGINS))["brightness"]
    calls = []
    load = entry.runtime_class.load
    monkeypatch.setattr(entry.runtime_class, "load", lambda self: (calls.append("load"), load(self))[1])
    monkeypatch.setattr(heap, "return_freed_memory", lambda: calls.append("heap"))
    runtime = registry.load_runtime(entry.runtime_class, entry.runtime_class.versions()[0])
    assert calls == ["load", "heap"] and isinstance(runtime, entry.runtime_class)


def test_loading_plugin_is_unavailable_then_serves():
    from dxserve_testplugins import slow

    from conftest import free_port

    slow.RELEASE.clear()  # held until this test releases it

    async def scenario():
        settings = Settings(ungated_versions_allowed=UNGATED, address=f"127.0.0.1:{free_port()}", plugins=["dxserve_testplugins.slow"], audit_db="",
                            disabled_plugins=ONLY_TEST_PLUGINS + ["flaky", "broken_load", "broken_import"], http_port=0)
        server = Server(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(settings.address) as channel:
                stub = pb_grpc.DiagnosticsServiceStub(channel)
                await asyncio.sleep(0.2)
                listed = {p.name: p.state for p in (await stub.ListPlugins(pb.ListPluginsRequest())).plugins}
                request = pb.ClassifyRequest(plugin="slow", image=pb.Image(raw=pb.RawImage(pixels=b"\x80" * 12, width=2, height=2, channels=3)))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Classify(request)
                slow.RELEASE.set()
                await server.wait_loaded()
                response = await stub.Classify(request)
                return listed, caught.value.code(), response
        finally:
            slow.RELEASE.set()
            await server.stop(0)

    listed, code, response = asyncio.run(scenario())
    assert listed["slow"] == pb.PLUGIN_STATE_LOADING
    assert code == grpc.StatusCode.UNAVAILABLE
    assert response.plugin == "slow" and len(response.probabilities) == 2


def test_an_unexpected_server_error_costs_one_stream_item(monkeypatch):
    import struct

    from conftest import free_port
    from dxserve import images

    real_decode = images.decode

    def decode(image, *args):
        if image.raw.width == 3:
            raise struct.error("a decoder bug")
        return real_decode(image, *args)

    monkeypatch.setattr(images, "decode", decode)

    async def scenario():
        settings = Settings(ungated_versions_allowed=UNGATED, address=f"127.0.0.1:{free_port()}", disabled_plugins=ONLY_TEST_PLUGINS + ["flaky", "broken_load", "broken_import"],
                            audit_db="", http_port=0)  # no HTTP door: a server of the quick start may hold 8000
        server = Server(settings)
        await server.start()
        await server.wait_loaded()
        try:
            async with grpc.aio.insecure_channel(settings.address) as channel:
                stub = pb_grpc.DiagnosticsServiceStub(channel)
                requests = [pb.ClassifyRequest(plugin="brightness", image=pb.Image(raw=pb.RawImage(pixels=b"\x80" * (w * w * 3), width=w, height=w, channels=3)))
                            for w in (2, 3, 4)]
                return [r async for r in stub.ClassifyStream(iter(requests))]
        finally:
            await server.stop(0)

    responses = asyncio.run(scenario())
    assert [r.WhichOneof("outcome") for r in responses] == ["result", "error", "result"]
    assert responses[1].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert responses[1].error.message.startswith("unexpected server error")


def test_a_plugin_returning_something_else_is_failed(tmp_path, monkeypatch):
    (tmp_path / "dxserve_not_a_runtime.py").write_text(
        "from dxserve import hookimpl\n\n@hookimpl\ndef dxserve_model_runtimes():\n    return [object]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = discover(Settings(ungated_versions_allowed=UNGATED, plugins=["dxserve_not_a_runtime"], disabled_plugins=ONLY_TEST_PLUGINS))
    assert plugins["dxserve_not_a_runtime"].state == FAILED
    assert "not a ModelRuntime subclass" in plugins["dxserve_not_a_runtime"].reason
    assert plugins["brightness"].state == LOADING  # the others are unaffected
