"""The Open Inference Protocol v2 facade (inference.GRPCInferenceService, dxserve/inference.py):
its wire format is tritonclient's, Triton's own client drives it end to end, and its results,
errors and audit rows are dxserve.v1's for the same images."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import grpc
import numpy as np
import pytest
from conftest import DEFAULT_VERSION, FIXTURES, ROOT, ServerProcess, free_port, png_bytes, wait_serving
from PIL import Image

from dxserve.auth import KeyFile
from dxserve.inference import deserialize_bytes, serialize_bytes
from dxserve.oip import grpc_service_pb2 as oip
from dxserve.oip import grpc_service_pb2_grpc as oip_grpc
from dxserve_client import Client
from dxserve_client.client import DxServeError

SCRIPT = ROOT / "tests" / "oip_tritonclient.py"
CELLS = FIXTURES / "cells"
Tensor = oip.ModelInferRequest.InferInputTensor


def run_script(python: str, *args: str, timeout_s: float = 300) -> None:
    done = subprocess.run([python, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-5000:]


def test_every_declared_field_is_tritons(triton_python, tmp_path):
    """Same package, service, methods, and for every message and field we declare the same
    number, type and cardinality as tritonclient's generated code: the wire format matches."""
    run_script(triton_python, "descriptors", str(tmp_path / "theirs.json"))
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == theirs["service"] == "inference.GRPCInferenceService"
    for method in service.methods:
        assert [method.input_type.full_name, method.output_type.full_name] == theirs["methods"][method.name]
    checked = 0

    def walk(message):
        nonlocal checked
        assert message.full_name in theirs["messages"], message.full_name
        for field in message.fields:
            ours = [field.number, field.type, field.is_repeated,
                    field.message_type.full_name if field.message_type else (field.enum_type.full_name if field.enum_type else "")]
            assert ours == theirs["messages"][message.full_name][field.name], f"{message.full_name}.{field.name}"
            checked += 1
        for nested in message.nested_types:
            walk(nested)

    for message in oip.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    assert checked > 60
    for enum in oip.DESCRIPTOR.enum_types_by_name.values():
        assert {v.name: v.number for v in enum.values} == theirs["enums"][enum.full_name]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with callers: `lab` may use lymphoblast, `other` only brightness."""
    tmp = tmp_path_factory.mktemp("oip")
    keys = KeyFile.load(tmp / "callers.json")
    tokens = {"lab": keys.add("lab", ["lymphoblast"]), "other": keys.add("other", ["brightness"])}
    keys.save()
    http_port = free_port()
    server = ServerProcess("--auth-keys-file", str(tmp / "callers.json"), "--http-port", str(http_port), tmp=tmp)
    server.http = f"127.0.0.1:{http_port}"
    try:
        wait_serving(server.address, [None, "lymphoblast"])
    except TimeoutError:
        server.stop()
        raise AssertionError("server did not start:\n" + server.logs()[-5000:]) from None
    yield server, tokens
    assert server.stop() == 0, server.logs()[-3000:]


def audit_rows(path, method: str, expected: int, timeout_s: float = 20) -> list[dict]:
    """The audit rows of `method`, once there are `expected` of them (the writer runs behind the answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(path) as connection:
            connection.row_factory = sqlite3.Row
            rows = [dict(r) for r in connection.execute("SELECT * FROM audit WHERE method = ? ORDER BY seq", (method,))]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _same(result: dict, expected, row: int = 0) -> None:
    """What tritonclient saw for one image (row of a batch) is dxserve.v1's result for it."""
    assert result["model_version"] == expected.model_version and result["weights_sha256"] == expected.weights_sha256
    assert result["probabilities"][row] == pytest.approx([expected.probabilities[l] for l in ("lymphoblast", "normal")],
                                                         abs=1e-6)
    assert result["label"][row] == expected.top_label and result["decision"][row] == expected.decision
    assert result["reason"][row] == expected.reason


def test_tritonclient_drives_the_facade(triton_python, secured, tmp_path):
    server, tokens = secured
    run_script(triton_python, "drive", server.address, tokens["lab"], tokens["other"], str(CELLS), str(tmp_path / "seen.json"))
    seen = json.loads((tmp_path / "seen.json").read_text())
    files = sorted(CELLS.glob("*.png"))
    with Client(server.address, token=tokens["lab"]) as client:
        v1 = {p.name: client.classify(p.read_bytes()) for p in files}
        with pytest.raises(DxServeError) as v1_unknown:
            client.classify(files[0].read_bytes(), plugin="no-such-model")

    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"]["name"] == "dxserve"
    metadata = seen["metadata"]
    assert metadata["name"] == "lymphoblast" and metadata["platform"] == "dxserve"
    assert DEFAULT_VERSION in metadata["versions"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("IMAGE", "BYTES", ["-1", "1"]), ("PIXELS", "UINT8", ["-1", "-1", "-1", "3"])]
    assert [t["name"] for t in metadata["outputs"]] == ["PROBABILITIES", "LABEL", "DECISION", "REASON"]
    config = seen["config"]["config"]
    assert config["max_batch_size"] == 12 and config["backend"] == "dxserve"
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("IMAGE", "TYPE_STRING"), ("PIXELS", "TYPE_UINT8")]
    assert config["output"][0] == {"name": "PROBABILITIES", "data_type": "TYPE_FP32", "dims": ["2"]}

    for name, expected in v1.items():
        _same(seen["encoded"][name], expected)
        _same(seen["pixels"][name], expected)  # raw pixels: the same cell, the same answer
        assert seen["encoded"][name]["id"] == name.removesuffix(".png")
    for row, name in enumerate(p.name for p in files):  # one request, four images
        _same(seen["batch"], v1[name], row)
    assert seen["only_label"] == ["LABEL"]

    stream = seen["stream"]
    assert len(stream) == 20 and "not a readable image" in stream[7]["error"]
    for i, (answer, name) in enumerate(zip(stream, seen["stream_files"], strict=True)):
        if i != 7:
            _same(answer, v1[name])
            assert answer["id"] == f"cell-{i}"  # in order

    # A caller limited to some plugins learns nothing of others: as in dxserve.v1, PERMISSION_DENIED.
    assert seen["unknown_model"] == [str(v1_unknown.value.code), v1_unknown.value.message]
    assert v1_unknown.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert seen["unknown_version"][0] == "StatusCode.NOT_FOUND" and "9.9.9" in seen["unknown_version"][1]
    assert seen["no_token"][0] == seen["bad_token"][0] == "StatusCode.UNAUTHENTICATED"
    assert seen["not_allowed"][0] == seen["not_allowed_metadata"][0] == "StatusCode.PERMISSION_DENIED"
    assert seen["too_many"][0] == "StatusCode.INVALID_ARGUMENT" and "max_batch_size is 12" in seen["too_many"][1]

    # Every image is an audit row like any other: each cell encoded, as pixels and in the batch,
    # one more for the label alone; 4 refused after identification (the unidentified never get this far).
    answered_count = 3 * len(files) + 1
    rows = audit_rows(server.audit_path, "ModelInfer", answered_count + 4)
    assert sorted(r["status"] for r in rows) == ["INVALID_ARGUMENT", "NOT_FOUND"] + ["OK"] * answered_count + ["PERMISSION_DENIED"] * 2
    answered = [r for r in rows if r["status"] == "OK"]
    assert {r["caller"] for r in rows} == {"lab", "other"}
    assert all(r["weights_sha256"] == v1[files[0].name].weights_sha256 and len(r["input_sha256"]) == 64 for r in answered)
    streamed = audit_rows(server.audit_path, "ModelStreamInfer", 20)
    assert [r["status"] for r in streamed].count("OK") == 19 and len(streamed) == 20


def test_tritonclient_http_drives_the_rest_door(triton_python, secured, tmp_path):
    """The same protocol over HTTP (issue 31): tritonclient.http (binary tensors, JSON outputs) gets
    dxserve.v1's answers, and its errors carry the HTTP status of the gRPC code."""
    server, tokens = secured
    run_script(triton_python, "drive-http", server.http, tokens["lab"], tokens["other"], str(CELLS), str(tmp_path / "seen.json"))
    seen = json.loads((tmp_path / "seen.json").read_text())
    files = sorted(CELLS.glob("*.png"))
    with Client(server.address, token=tokens["lab"]) as client:
        v1 = {p.name: client.classify(p.read_bytes()) for p in files}

    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"]["name"] == "dxserve"
    assert seen["metadata"]["name"] == "lymphoblast" and DEFAULT_VERSION in seen["metadata"]["versions"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in seen["metadata"]["inputs"]] == [
        ("IMAGE", "BYTES", [-1, 1]), ("PIXELS", "UINT8", [-1, -1, -1, 3])]
    assert seen["config"]["max_batch_size"] == 12 and seen["config"]["output"][0]["dims"] == [2]

    for name, expected in v1.items():
        _same(seen["encoded"][name], expected)
        _same(seen["pixels"][name], expected)
        assert seen["encoded"][name]["id"] == name.removesuffix(".png")
    for row, name in enumerate(p.name for p in files):
        _same(seen["batch"], v1[name], row)
    _same(seen["json_outputs"], v1[files[0].name])
    assert all("data" in o for o in seen["json_response"]["outputs"])  # asked for JSON, got JSON

    assert seen["unknown_model"][0] == seen["not_allowed"][0] == "403"  # a limited caller learns nothing of others
    assert seen["unknown_version"][0] == "404" and "9.9.9" in seen["unknown_version"][1]
    assert seen["no_token"][0] == seen["bad_token"][0] == "401"
    assert seen["too_many"][0] == "400" and "max_batch_size is 12" in seen["too_many"][1]
    assert seen["not_an_image"][0] == "400" and "not a readable image" in seen["not_an_image"][1]

    # Audit rows as gRPC's, their method says the door: each cell encoded, as pixels and in the batch,
    # the JSON one, and the refusals after identification (unknown model, version, batch, image).
    answered_count = 3 * len(files) + 1
    rows = audit_rows(server.audit_path, "HTTP ModelInfer", answered_count + 5)
    assert sorted(r["status"] for r in rows) == ["INVALID_ARGUMENT"] * 2 + ["NOT_FOUND"] + ["OK"] * answered_count + \
        ["PERMISSION_DENIED"] * 2
    assert {r["caller"] for r in rows} == {"lab", "other"}


def curl(*args: str) -> tuple[int, dict]:
    """curl's HTTP status and JSON body."""
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body) if body else {}


def test_curl_speaks_json_to_the_rest_door(secured, tmp_path):
    """Plain JSON over HTTP: probes, metadata, an image in base64, and each bad request's typed error."""
    import base64

    server, tokens = secured
    base, auth = f"http://{server.http}/v2", ("-H", f"Authorization: Bearer {tokens['lab']}")
    cell = sorted(CELLS.glob("*.png"))[0]
    with Client(server.address, token=tokens["lab"]) as client:
        expected = client.classify(cell.read_bytes())

    assert curl(f"{base}/health/live") == (200, {"live": True})  # probes need no token, as gRPC health
    assert curl(f"{base}/health/ready") == (200, {"ready": True})
    assert curl(*auth, f"{base}/models/lymphoblast/versions/{DEFAULT_VERSION}/ready") == (200, {"name": "lymphoblast",
                                                                                            "ready": True})
    request = {"id": "cell-1", "parameters": {"specimen_id": "SMEAR-7"}, "inputs": [
        {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(cell.read_bytes()).decode()]}]}
    (tmp_path / "request.json").write_text(json.dumps(request))
    status, answer = curl(*auth, "-H", "Content-Type: application/json", "--data-binary", f"@{tmp_path / 'request.json'}",
                          f"{base}/models/lymphoblast/infer")
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert answer["id"] == "cell-1" and answer["model_version"] == expected.model_version
    assert answer["parameters"]["weights_sha256"] == expected.weights_sha256
    assert outputs["PROBABILITIES"]["shape"] == [1, 2]
    assert outputs["PROBABILITIES"]["data"] == pytest.approx([expected.probabilities["lymphoblast"],
                                                              expected.probabilities["normal"]], abs=1e-6)
    assert outputs["DECISION"]["data"] == [expected.decision] and outputs["LABEL"]["data"] == [expected.top_label]
    row = audit_rows(server.audit_path, "HTTP ModelInfer", 1)
    assert any(r["request_id"] == "cell-1" and r["specimen_id"] == "SMEAR-7" and r["status"] == "OK" for r in row)

    def refused(body: str, *extra: str, path: str = "models/lymphoblast/infer") -> tuple[int, dict]:
        (tmp_path / "bad.json").write_text(body)
        return curl(*extra, "--data-binary", f"@{tmp_path / 'bad.json'}", f"{base}/{path}")

    status, error = refused("{not json", *auth)
    assert status == 400 and error["code"] == "INVALID_ARGUMENT" and "not JSON" in error["error"]
    bad_base64 = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}
    status, error = refused(json.dumps(bad_base64), *auth)
    assert status == 400 and "base64" in error["error"] and error["details"][0]["@type"] == "google.rpc.BadRequest"
    wrong_count = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [2, 2, 3], "data": [1, 2, 3]}]}
    status, error = refused(json.dumps(wrong_count), *auth)
    assert status == 400 and "holds 3 elements" in error["error"]
    status, error = refused(json.dumps(request))  # no token
    assert status == 401 and error["code"] == "UNAUTHENTICATED"
    status, error = refused(json.dumps(request), "-H", f"Authorization: Bearer {tokens['other']}")
    assert status == 403 and error["code"] == "PERMISSION_DENIED"
    status, error = curl(*auth, f"{base}/models/lymphoblast/versions/9.9.9")
    assert status == 404 and error["reason"] == "MODEL_VERSION_NOT_FOUND" and DEFAULT_VERSION in error["error"]
    # A body that could not be read is answered and recorded like any refused image, as over gRPC.
    refused = [r for r in audit_rows(server.audit_path, "HTTP ModelInfer", 4) if r["status"] == "INVALID_ARGUMENT"]
    assert any("not JSON" in r["detail"] for r in refused) and any("base64" in r["detail"] for r in refused)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def infer(stub, *inputs: Tensor, raw: list[bytes] | None = None, **fields) -> oip.ModelInferResponse:
    return stub.ModelInfer(oip.ModelInferRequest(model_name=fields.pop("model_name", "lymphoblast"), inputs=inputs,
                                                 raw_input_contents=raw or [], **fields), timeout=60)


def refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_a_flood_of_empty_elements_is_counted_not_copied(stub):
    """Issue 32: a BYTES tensor of a million empty elements under a shape of [1] (typed or raw) is
    refused by its count, read in O(1) or stopped at the shape's count, before any element is copied."""
    typed = Tensor(name="IMAGE", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[b""] * 1_000_000))
    code, message = refusal(lambda: infer(stub, typed))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "holds 1000000 elements; its shape says 1" in message
    code, message = refusal(lambda: infer(stub, Tensor(name="IMAGE", datatype="BYTES", shape=[1]),
                                          raw=[serialize_bytes([b""] * 1_000_000)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than the 1 elements the shape says" in message
    pixels = Tensor(name="PIXELS", datatype="UINT8", shape=[1, 2, 2, 3], contents=oip.InferTensorContents(uint_contents=[7] * 500_000))
    code, message = refusal(lambda: infer(stub, pixels))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 12 values; got 500000" in message


def test_a_request_over_the_limit_is_refused_before_it_is_parsed(server):
    """Issue 32: an OIP request is parsed only once its size is within max_message_bytes (4 MiB on
    this server; the transport takes 4x), since a tensor of millions of elements costs its parse;
    bytes that are no ModelInferRequest are INVALID_ARGUMENT. Both are answered and recorded."""
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        send = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes as they are
        big = oip.ModelInferRequest(model_name="lymphoblast", inputs=[Tensor(
            name="PIXELS", datatype="UINT8", shape=[1, 1000, 1000, 3],
            contents=oip.InferTensorContents(uint_contents=[200] * 3_000_000))]).SerializeToString()
        assert 4 * 2**20 < len(big) < 16 * 2**20
        code, message = refusal(lambda: send(big, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in message
        code, message = refusal(lambda: send(b"\xff\xff\xff\xff", timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a ModelInferRequest" in message


def test_typed_contents_answer_as_raw_ones(stub):
    """The protocol's other encoding: BYTES in bytes_contents, UINT8 in uint_contents."""
    cell = sorted(CELLS.glob("*.png"))[0]
    rgb = np.asarray(Image.open(cell).convert("RGB"))
    raw = infer(stub, Tensor(name="IMAGE", datatype="BYTES", shape=[1]), raw=[serialize_bytes([cell.read_bytes()])])
    typed = infer(stub, Tensor(name="IMAGE", datatype="BYTES", shape=[1, 1],
                               contents=oip.InferTensorContents(bytes_contents=[cell.read_bytes()])))
    pixels = infer(stub, Tensor(name="PIXELS", datatype="UINT8", shape=list(rgb.shape),
                                contents=oip.InferTensorContents(uint_contents=rgb.reshape(-1).tolist())))
    probabilities = [np.frombuffer(r.raw_output_contents[0], "<f4") for r in (raw, typed, pixels)]
    assert np.allclose(probabilities[0], probabilities[1]) and np.allclose(probabilities[0], probabilities[2])
    assert raw.model_version == DEFAULT_VERSION and [o.name for o in raw.outputs][0] == "PROBABILITIES"
    assert deserialize_bytes(raw.raw_output_contents[2], 1)[0] in (b"lymphoblast", b"normal", b"indeterminate")


def test_malformed_tensors_are_refused_with_the_reason(stub):
    cell = sorted(CELLS.glob("*.png"))[0].read_bytes()
    bad = {
        "no input": dict(),
        "two inputs": dict(inputs=[Tensor(name="IMAGE", datatype="BYTES", shape=[1])] * 2),
        "wrong datatype": dict(inputs=[Tensor(name="IMAGE", datatype="FP32", shape=[1])], raw=[b"1234"]),
        "truncated BYTES": dict(inputs=[Tensor(name="IMAGE", datatype="BYTES", shape=[1])], raw=[serialize_bytes([cell])[:-9]]),
        "count off": dict(inputs=[Tensor(name="IMAGE", datatype="BYTES", shape=[2])], raw=[serialize_bytes([cell])]),
        "pixels short": dict(inputs=[Tensor(name="PIXELS", datatype="UINT8", shape=[1, 8, 8, 3])], raw=[bytes(100)]),
        "pixel value out of range": dict(inputs=[Tensor(name="PIXELS", datatype="UINT8", shape=[1, 1, 3],
                                                        contents=oip.InferTensorContents(uint_contents=[1, 2, 300]))]),
        "negative dimension": dict(inputs=[Tensor(name="PIXELS", datatype="UINT8", shape=[-1, 8, 3])]),
        "unknown output": dict(inputs=[Tensor(name="IMAGE", datatype="BYTES", shape=[1])], raw=[serialize_bytes([cell])],
                               outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="HEATMAP")]),
        "unknown parameter": dict(inputs=[Tensor(name="IMAGE", datatype="BYTES", shape=[1])], raw=[serialize_bytes([cell])],
                                  parameters={"specimen-id": oip.InferParameter(string_param="S1")}),
    }
    for name, fields in bad.items():
        inputs, raw = fields.pop("inputs", []), fields.pop("raw", None)
        code, message = refusal(lambda: infer(stub, *inputs, raw=raw, **fields))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, message)
    code, message = refusal(lambda: infer(stub, Tensor(name="IMAGE", datatype="BYTES", shape=[1]), raw=[serialize_bytes([cell])],
                                          model_name="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-model" in message
    # A real image too small, a pinned hash that is not served: dxserve.v1's own refusals, in OIP words.
    tiny = png_bytes(np.zeros((4, 4, 3), np.uint8))
    code, message = refusal(lambda: infer(stub, Tensor(name="IMAGE", datatype="BYTES", shape=[1]), raw=[serialize_bytes([tiny])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "minimum side" in message
    code, _ = refusal(lambda: infer(stub, Tensor(name="IMAGE", datatype="BYTES", shape=[1]), raw=[serialize_bytes([cell])],
                                    parameters={"weights_sha256": oip.InferParameter(string_param="0" * 64)}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_stream_answers_each_request_in_order_and_errors_in_band(stub):
    cell = sorted(CELLS.glob("*.png"))[0].read_bytes()

    def requests():
        for i in range(6):
            model = "no-such-model" if i == 2 else "lymphoblast"
            data = b"junk" if i == 4 else cell
            yield oip.ModelInferRequest(model_name=model, id=f"r{i}", inputs=[Tensor(name="IMAGE", datatype="BYTES", shape=[1])],
                                        raw_input_contents=[serialize_bytes([data])])

    answers = list(stub.ModelStreamInfer(requests(), timeout=120))
    assert [a.infer_response.id for a in answers] == [f"r{i}" for i in range(6)]
    assert [bool(a.error_message) for a in answers] == [False, False, True, False, True, False]
    assert "no-such-model" in answers[2].error_message and "not a readable image" in answers[4].error_message


def test_model_ready_follows_the_plugin_state(stub):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ModelReady(oip.ModelReadyRequest(name="lymphoblast")).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="lymphoblast", version=DEFAULT_VERSION)).ready
    # The session server's broken plugins: one fails in load() (known, never ready), one cannot
    # even be imported (nothing to describe: UNAVAILABLE, with why).
    assert not stub.ModelReady(oip.ModelReadyRequest(name="broken_load")).ready
    code, message = refusal(lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name="broken_import")))
    assert code == grpc.StatusCode.UNAVAILABLE and "dxserve_no_such_dependency" in message
    code, _ = refusal(lambda: stub.ModelReady(oip.ModelReadyRequest(name="lymphoblast", version="0.0.0")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_rest_body_over_the_limit_is_cut_off_and_answered_413():
    """The REST door reads no more than 4x max_message_bytes of a body (as gRPC's transport), then
    answers 413 in the server's words (MESSAGE_TOO_LARGE), and serves on."""
    import urllib.error
    import urllib.request

    from dxserve.testing import serving

    port = free_port()
    with serving("lymphoblast", http_port=port, max_message_bytes=2**20):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/lymphoblast/infer", data=b"x" * (5 * 2**20),
                                         method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        error = json.loads(caught.value.read())
        assert caught.value.code == 413 and error["reason"] == "MESSAGE_TOO_LARGE" and "max_message_bytes" in error["error"]
        assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30).read()) == {"ready": True}
