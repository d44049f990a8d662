"""The gRPC API against a real server: results, per-item stream errors, call errors."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from PIL import Image

from conftest import DEFAULT_VERSION, PREVIOUS_VERSION, png_bytes

from dxserve.v1 import diagnostics_pb2 as pb
from dxserve_client import DxServeError

TTA8 = f"{DEFAULT_VERSION}-tta8"  # the default's weights, averaged over 8 orientations


def test_list_plugins_reports_every_plugin_with_state(client):
    plugins = {p.name: p for p in client.list_plugins()}
    assert list(plugins) == sorted(plugins)
    assert set(plugins) >= {"lymphoblast", "brightness", "flaky", "broken_import", "broken_load"}

    lymph = plugins["lymphoblast"]
    assert lymph.state == pb.PLUGIN_STATE_READY
    assert list(lymph.labels) == ["lymphoblast", "normal"]
    assert lymph.default_model_version == lymph.model_versions[0].version
    version = lymph.model_versions[0]
    assert len(version.weights_sha256) == 64
    card = json.loads(version.model_card_json)
    assert card["litert"]["sha256"] == version.weights_sha256  # the file that is served (issue 30: LiteRT)
    assert "Intended use" in version.model_card and "Research use" in lymph.intended_use
    assert set(lymph.input.formats) == {"PNG", "JPEG", "BMP", "TIFF"}
    assert lymph.input.max_pixels == 4_000_000 and lymph.input.max_message_bytes == 4 * 1024 * 1024

    assert plugins["broken_import"].state == pb.PLUGIN_STATE_FAILED
    assert "dxserve_no_such_dependency" in plugins["broken_import"].state_reason
    assert plugins["broken_load"].state == pb.PLUGIN_STATE_FAILED
    assert "missing-weights.json" in plugins["broken_load"].state_reason


def test_classify_real_cell(client, cell_paths):
    result = client.classify(cell_paths[0], request_id="cell-1")
    assert result.request_id == "cell-1"
    assert result.plugin == "lymphoblast"
    assert set(result.probabilities) == {"lymphoblast", "normal"}
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.top_label == max(result.probabilities, key=result.probabilities.get)
    assert result.confidence == pytest.approx(max(result.probabilities.values()))
    assert result.decision in {"lymphoblast", "normal", "indeterminate"}
    assert result.indeterminate == (result.decision == "indeterminate")
    assert result.indeterminate or result.decision == result.top_label  # a call never contradicts the probabilities
    assert result.rule.startswith("call lymphoblast at") and result.model_version in result.rule
    assert isinstance(result.screen_positive, bool)
    assert result.reason
    plugin = next(p for p in client.list_plugins() if p.name == "lymphoblast")
    assert result.model_version == plugin.default_model_version
    assert result.weights_sha256 == plugin.model_versions[0].weights_sha256
    assert result.model_ms > 0 and result.batch_size >= 1


def test_server_makes_request_id_when_empty(client, cell_paths):
    assert len(client.classify(cell_paths[0]).request_id) == 36  # a UUID


def test_same_cell_as_png_and_raw_pixels_agree(client, cell_paths):
    rgb = np.asarray(Image.open(cell_paths[1]).convert("RGB"))
    from_file = client.classify(cell_paths[1])
    from_raw = client.classify(rgb)
    assert from_raw.probabilities["lymphoblast"] == pytest.approx(from_file.probabilities["lymphoblast"], abs=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grey_rgba_and_16bit_images_are_accepted(client, cell_paths, mode):
    rgb = np.asarray(Image.open(cell_paths[0]).convert("RGB"))
    if mode == "I;16":
        image = Image.fromarray((rgb.mean(axis=-1) * 257).astype(np.uint16))
    else:
        image = Image.fromarray(rgb).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    result = client.classify(buffer.getvalue())
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_encodings(client, cell_paths, fmt):
    buffer = io.BytesIO()
    Image.open(cell_paths[0]).convert("RGB").save(buffer, format=fmt)
    assert client.classify(buffer.getvalue()).ok


def _bomb() -> bytes:
    """A 20000 x 20000 PNG of a few hundred KB: 400 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


BAD_IMAGES = {
    "empty": (b"", "IMAGE_EMPTY"),
    "text": (b"patient notes, not an image\n" * 10, "IMAGE_UNREADABLE"),
    "truncated_png": (None, "IMAGE_CORRUPT"),
    "bomb": (None, "IMAGE_TOO_LARGE"),
    "gif": (None, "IMAGE_FORMAT"),
    "too_small": (None, "IMAGE_TOO_SMALL"),
}


def _bad(name: str) -> bytes:
    data, _ = BAD_IMAGES[name]
    if name == "truncated_png":
        return png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[:400]
    if name == "bomb":
        return _bomb()
    if name == "gif":
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buffer, format="GIF")
        return buffer.getvalue()
    if name == "too_small":
        return png_bytes(np.zeros((8, 8, 3), np.uint8))
    return data


def _violation(error: DxServeError) -> error_details_pb2.BadRequest:
    return next(d for d in error.details if isinstance(d, error_details_pb2.BadRequest))


def _reason(details) -> str:
    return next(d.reason for d in details if isinstance(d, error_details_pb2.ErrorInfo))


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_get_invalid_argument_with_field_violation(client, name):
    with pytest.raises(DxServeError) as caught:
        client.classify(_bad(name))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    violation = _violation(caught.value).field_violations[0]
    assert violation.field.startswith("image")
    assert violation.description
    assert _reason(caught.value.details) == BAD_IMAGES[name][1]


def test_zero_size_raw_image(client):
    request = pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(raw=pb.RawImage(pixels=b"", width=0, height=0, channels=3)))
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Classify(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_raw_pixels_of_wrong_length(client):
    request = pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(raw=pb.RawImage(pixels=b"\0" * 10, width=4, height=4, channels=3)))
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Classify(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "48 bytes" in caught.value.details()


def test_missing_image(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Classify(pb.ClassifyRequest(plugin="lymphoblast"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_plugin_is_not_found(client, cell_paths):
    with pytest.raises(DxServeError) as caught:
        client.classify(cell_paths[0], plugin="no-such-plugin")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    info = next(d for d in caught.value.details if isinstance(d, error_details_pb2.ResourceInfo))
    assert info.resource_type == "plugin" and info.resource_name == "no-such-plugin"


def test_unknown_version_is_not_found(client, cell_paths):
    with pytest.raises(DxServeError) as caught:
        client.classify(cell_paths[0], model_version="9.9.9")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "9.9.9" in caught.value.message


def test_failed_plugin_is_unavailable_with_reason(client, cell_paths):
    with pytest.raises(DxServeError) as caught:
        client.classify(cell_paths[0], plugin="broken_load")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "missing-weights.json" in caught.value.message
    assert _reason(caught.value.details) == "PLUGIN_FAILED"


def test_oversized_message_is_refused_and_server_keeps_serving(client, cell_paths):
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Classify(pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(encoded=b"\0" * (5 * 1024 * 1024))), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.classify(cell_paths[0]).ok


def test_an_oversized_stream_item_costs_that_item_only(client, cell_paths):
    """The transport takes more than the per-request limit, so a 5 MiB item (limit 4 MiB) is
    refused alone, with its details, and the stream goes on."""
    big = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)  # 5.9 MB raw
    results = list(client.classify_stream([cell_paths[0], big, cell_paths[1]]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error_code == "RESOURCE_EXHAUSTED" and "max_message_bytes" in results[1].error_message
    assert _reason(results[1].error_details) == "MESSAGE_TOO_LARGE"


def test_second_plugin_serves_beside_lymphoblast(client):
    bright = client.classify(np.full((32, 32, 3), 230, np.uint8), plugin="brightness")
    dark = client.classify(np.full((32, 32, 3), 20, np.uint8), plugin="brightness")
    assert (bright.top_label, dark.top_label) == ("bright", "dark")
    assert bright.model_version == "2.0"


def test_stream_answers_every_item_in_order_past_bad_ones(client, cell_paths):
    items = [("a", cell_paths[0]), ("b", b"not an image"), ("c", cell_paths[1]), ("d", b""),
             ("e", _bomb()), ("f", cell_paths[2])]
    results = list(client.classify_stream(items))
    assert [r.request_id for r in results] == ["a", "b", "c", "d", "e", "f"]
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    assert {r.error_code for r in results if not r.ok} == {"INVALID_ARGUMENT"}
    assert _reason(results[4].error_details) == "IMAGE_TOO_LARGE"
    single = client.classify(cell_paths[1])
    assert results[2].probabilities["lymphoblast"] == pytest.approx(single.probabilities["lymphoblast"], abs=1e-5)


def test_stream_of_many_items_is_batched(client, cell_paths):
    images = [cell_paths[i % len(cell_paths)] for i in range(48)]
    results = list(client.classify_stream(images))
    assert len(results) == 48 and all(r.ok for r in results)
    assert max(r.batch_size for r in results) > 1
    # Same image, same answer, whatever batch it rode in.
    by_path = {}
    for path, r in zip(images, results, strict=True):
        by_path.setdefault(path, set()).add(round(r.probabilities["lymphoblast"], 4))
    assert all(len(v) == 1 for v in by_path.values())


def test_stream_items_with_unknown_plugin_fail_alone(client, cell_paths):
    requests = [pb.ClassifyRequest(request_id="x", plugin="nope", image=pb.Image(encoded=cell_paths[0].read_bytes())),
                pb.ClassifyRequest(request_id="y", plugin="lymphoblast", image=pb.Image(encoded=cell_paths[0].read_bytes()))]
    responses = list(client.stub.ClassifyStream(iter(requests), timeout=60))
    assert [r.index for r in responses] == [0, 1]
    assert responses[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses[1].WhichOneof("outcome") == "result"


def test_plugin_that_raises_fails_only_its_item(client):
    magenta = np.zeros((16, 16, 3), np.uint8)
    magenta[...] = (255, 0, 255)
    grey = np.full((16, 16, 3), 128, np.uint8)
    results = list(client.classify_stream([grey, magenta, grey, grey], plugin="flaky"))
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].error_code == "INTERNAL"
    assert "magenta breaks this model" in results[1].error_message
    with pytest.raises(DxServeError) as caught:
        client.classify(magenta, plugin="flaky")
    assert caught.value.code == grpc.StatusCode.INTERNAL


def test_deadline_exceeded(client, cell_paths):
    with pytest.raises(DxServeError) as caught:
        client.classify(cell_paths[0], timeout_s=0.001)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.classify(cell_paths[0]).ok


def test_health_per_plugin(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = lambda s: stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status  # noqa: E731
        assert status("") == health_pb2.HealthCheckResponse.SERVING
        assert status("dxserve.v1.DiagnosticsService/lymphoblast") == health_pb2.HealthCheckResponse.SERVING
        assert status("dxserve.v1.DiagnosticsService/broken_load") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            status("dxserve.v1.DiagnosticsService/unknown")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_lists_and_describes_the_services(server, version):
    from google.protobuf import descriptor_pb2

    if version == "v1alpha":
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    else:
        from dxserve.v1 import grpc_reflection_v1_pb2 as reflection_pb2
        from dxserve.v1 import grpc_reflection_v1_pb2_grpc as reflection_pb2_grpc
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="dxserve.v1.DiagnosticsService"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        ]), timeout=10)
        listed, described, unknown = list(responses)
    names = {s.name for s in listed.list_services_response.service}
    assert {"dxserve.v1.DiagnosticsService", "dxserve.v1.AdminService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in described.file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "dxserve.v1" and any(s.name == "DiagnosticsService" for s in f.service) for f in files)
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_failures_are_logged_as_json_without_pixels(client, server):
    with pytest.raises(DxServeError):
        client.classify(b"\x89PNG\r\n\x1a\n" + b"\x07" * 300, request_id="log-me")
    import time

    for _ in range(50):
        lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
        failures = [line for line in lines if line.get("request_id") == "log-me"]
        if failures:
            break
        time.sleep(0.1)
    assert failures and failures[0]["code"] == "INVALID_ARGUMENT" and failures[0]["plugin"] == "lymphoblast"
    assert "\\x07" not in server.logs() and "\x07" not in server.logs()
    # Only JSON lines: LiteRT's, TensorFlow's and gRPC's own C++ lines are routed through the
    # "native" logger, and below WARNING silenced (LiteRT's "INFO: Created ... XNNPACK delegate").
    records = [json.loads(line) for line in server.logs().splitlines()]
    assert not [r for r in records if r["name"] == "native" and r["levelname"] not in ("WARNING", "ERROR", "CRITICAL")]
    assert "XNNPACK delegate" not in server.logs()


def test_an_item_over_the_transport_limit_ends_only_its_stream(client, cell_paths):
    """A message over even the transport's limit (4x max_message_bytes) cannot be read, so it
    fails its stream (RESOURCE_EXHAUSTED), after the items before it were answered; other calls go on."""
    def requests():
        yield pb.ClassifyRequest(request_id="ok", plugin="lymphoblast", image=pb.Image(encoded=cell_paths[0].read_bytes()))
        yield pb.ClassifyRequest(request_id="huge", plugin="lymphoblast", image=pb.Image(encoded=b"\0" * (17 * 1024 * 1024)))

    answered = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in client.stub.ClassifyStream(requests(), timeout=60):
            answered.append(response.request_id)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "huge" not in answered
    assert client.classify(cell_paths[0]).ok


def test_client_that_disappears_mid_stream_harms_no_one(client, server, cell_paths):
    data = cell_paths[0].read_bytes()
    requests = (pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(encoded=data)) for _ in range(200))
    responses = client.stub.ClassifyStream(requests, timeout=60)
    next(responses)
    responses.cancel()  # as a crashed acquisition program would
    with pytest.raises(grpc.RpcError) as caught:
        list(responses)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert client.classify(cell_paths[1]).ok
    assert "unexpected error" not in server.logs() and "Traceback" not in server.logs()


def test_quality_gate_answers_indeterminate_with_reasons(client, cell_paths):
    """A blank frame and a tile of cells are never labelled, whatever the model says; a real
    cell passes; a plugin without a gate always passes."""
    cell = np.asarray(Image.open(cell_paths[0]).convert("RGB"))
    blank = np.zeros_like(cell)
    tiled = np.tile(np.asarray(Image.fromarray(cell).resize((150, 150))), (3, 3, 1))
    real, *refused = list(client.classify_stream([cell, blank, tiled]))
    assert real.quality_passed and real.quality_issues == ()
    for result, code in zip(refused, ("NO_CELL", "MULTIPLE_CELLS")):
        assert result.ok and not result.quality_passed
        assert result.decision == "indeterminate" and result.indeterminate
        assert code in [c for c, _ in result.quality_issues] and code in result.reason
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)  # still reported, not acted on
    assert client.classify(blank, plugin="brightness").quality_passed


def test_quality_gate_fields_on_the_wire(server):
    from dxserve.v1 import diagnostics_pb2_grpc as pb_grpc

    request = pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(raw=pb.RawImage(
        pixels=bytes(64 * 64 * 3), width=64, height=64, channels=3)))
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.DiagnosticsServiceStub(channel).Classify(request, timeout=60)
    assert not response.quality.passed and response.decision.indeterminate
    issue = response.quality.issues[0]  # the pixel gate's first; the model's own OOD score may follow
    assert {i.code for i in response.quality.issues} <= {"NO_CELL", "OUT_OF_DISTRIBUTION"}
    assert issue.code == "NO_CELL" and issue.value == 0 and issue.accepted_min > 0 and issue.accepted_max == float("inf")


def test_out_of_distribution_image_is_indeterminate(client, cell_paths):
    """A cell-shaped checkerboard passes the pixel gate; the model's own features refuse it."""
    from test_lymphoblast import checkered_cell

    odd = checkered_cell(np.asarray(Image.open(cell_paths[0]).convert("RGB")))
    result = client.classify(odd)
    assert result.indeterminate and not result.quality_passed
    assert [code for code, _ in result.quality_issues] == ["OUT_OF_DISTRIBUTION"]


def test_other_versions_load_on_first_use_and_concurrent_first_calls_share_the_load(client, server, cell_paths):
    """Only the default version loads at start (cold start); the first calls naming another
    version wait for one load of it, and get that version's own answer."""
    from concurrent.futures import ThreadPoolExecutor

    plugin = next(p for p in client.list_plugins() if p.name == "lymphoblast")
    states = {v.version: v.state for v in plugin.model_versions}
    assert states[DEFAULT_VERSION] == pb.VERSION_STATE_READY and states[TTA8] == pb.VERSION_STATE_AVAILABLE  # listed, not loaded
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.classify(cell_paths[0], model_version=TTA8), range(4)))
    assert {r.model_version for r in results} == {TTA8}
    assert len({round(r.probabilities["lymphoblast"], 6) for r in results}) == 1
    assert server.logs().count(f'"loading model version on first use", "plugin": "lymphoblast", "version": "{TTA8}"') == 1
    assert results[0].weights_sha256 == plugin.model_versions[0].weights_sha256  # the same weights, averaged over 8 views
    plugin = next(p for p in client.list_plugins() if p.name == "lymphoblast")
    assert {v.version: v.state for v in plugin.model_versions}[TTA8] == pb.VERSION_STATE_READY


def test_versions_without_a_quality_gate_and_ood_check_are_not_served(client, server, cell_paths):
    """The safety contract: lymphoblast's 1.x versions have neither check, so a lab that pins
    one gets FAILED_PRECONDITION saying what is missing, not garbage labelled, and they never load."""
    from google.rpc import error_details_pb2

    plugin = next(p for p in client.list_plugins() if p.name == "lymphoblast")
    versions = {v.version: v for v in plugin.model_versions}
    assert list(versions[DEFAULT_VERSION].safety_checks) == list(versions[PREVIOUS_VERSION].safety_checks) == ["out_of_distribution", "quality_gate"]
    for old in ("1.0.0", "1.1.0", "1.2.0"):
        assert list(versions[old].safety_checks) == [] and versions[old].state == pb.VERSION_STATE_NOT_SERVED
        assert "quality_gate, out_of_distribution" in versions[old].state_reason
        with pytest.raises(DxServeError) as caught:
            client.classify(cell_paths[0], model_version=old)
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_UNGATED")
        failure = next(d for d in caught.value.details if isinstance(d, error_details_pb2.PreconditionFailure))
        assert (failure.violations[0].type, failure.violations[0].subject) == ("SAFETY_CHECKS", f"lymphoblast/{old}")
        pinned = pb.ClassifyRequest(plugin="lymphoblast", image=pb.Image(encoded=cell_paths[0].read_bytes()),
                                    weights_sha256=versions[old].weights_sha256)
        with pytest.raises(grpc.RpcError) as by_hash:  # pinning its weights instead of its name: the same refusal
            client.stub.Classify(pinned, timeout=30)
        assert by_hash.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Streams say so per item and go on.
        results = list(client.classify_stream([cell_paths[0], cell_paths[1]], model_version=old))
        assert [r.error_code for r in results] == ["FAILED_PRECONDITION"] * 2
    assert "loading model version on first use\", \"plugin\": \"lymphoblast\", \"version\": \"1." not in server.logs()
