"""Drive dxserve's Open Inference Protocol facade with Triton's own client, `tritonclient[grpc]`.

Run by tests/test_open_inference.py with the Python of a virtual environment that holds only
tritonclient (it pins protobuf below dxserve's), so nothing here imports dxserve:

    python oip_tritonclient.py descriptors OUT.json          # tritonclient's wire definitions
    python oip_tritonclient.py drive ADDRESS TOKEN OTHER_TOKEN CELLS_DIR OUT.json
    python oip_tritonclient.py drive-http HOST:PORT TOKEN OTHER_TOKEN CELLS_DIR OUT.json   # tritonclient.http

`drive` writes what the client saw (metadata, config, results, errors) as JSON.
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import numpy as np


def descriptors(out: Path) -> None:
    """Every field (number, type, label, message type) of every message in tritonclient's protos."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    def walk(message, into):
        into[message.full_name] = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else
                                            (f.enum_type.full_name if f.enum_type else "")] for f in message.fields}
        for nested in message.nested_types:
            walk(nested, into)

    found: dict = {}
    for module in (service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk(message, found)
    enums = {e.full_name: {v.name: v.number for v in e.values} for e in model_config_pb2.DESCRIPTOR.enum_types_by_name.values()}
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
    out.write_text(json.dumps({"messages": found, "enums": enums, "service": service.full_name, "methods": methods}))


def _encoded(triton, *datas: bytes):
    tensor = triton.InferInput("IMAGE", [len(datas), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[d] for d in datas], dtype=np.object_))
    return [tensor]


def _pixels(triton, path: Path):
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))[None]
    tensor = triton.InferInput("PIXELS", list(rgb.shape), "UINT8")
    tensor.set_data_from_numpy(rgb)
    return [tensor]


def _error(call) -> list[str]:
    """[status, message] of the refusal `call()` raised, or ["OK", ""]."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as refusal:
        return [refusal.status(), refusal.message()]
    return ["OK", ""]


def _metadata(client, headers: dict, **as_json) -> dict:
    """What a client sees before inferring: liveness, readiness, server and model metadata, config."""
    return {"live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
            "model_ready": client.is_model_ready("lymphoblast", headers=headers),
            "server": client.get_server_metadata(headers=headers, **as_json),
            "metadata": client.get_model_metadata("lymphoblast", headers=headers, **as_json),
            "config": client.get_model_config("lymphoblast", headers=headers, **as_json)}


def _infer_all(client, triton, headers: dict, files: list[Path], outputs) -> dict:
    """Each cell encoded and as pixels, and all in one batch."""
    encoded = lambda *datas: _encoded(triton, *datas)  # noqa: E731
    return {"encoded": {p.name: outputs(client.infer("lymphoblast", encoded(p.read_bytes()), request_id=p.stem,
                                                     headers=headers)) for p in files},
            "pixels": {p.name: outputs(client.infer("lymphoblast", _pixels(triton, p), headers=headers)) for p in files},
            "batch": outputs(client.infer("lymphoblast", encoded(*(p.read_bytes() for p in files)), headers=headers))}


def drive(address: str, token: str, other_token: str, cells: Path, out: Path) -> None:
    import tritonclient.grpc as triton

    headers = {"authorization": f"Bearer {token}"}
    client = triton.InferenceServerClient(address)
    files = sorted(cells.glob("*.png"))
    seen: dict = _metadata(client, headers, as_json=True)
    encoded, error = (lambda *datas: _encoded(triton, *datas)), _error

    def outputs(result) -> dict:
        text = lambda name: [v.decode() for v in result.as_numpy(name).reshape(-1)]  # noqa: E731
        return {"model_version": result.get_response().model_version, "id": result.get_response().id,
                "weights_sha256": result.get_response().parameters["weights_sha256"].string_param,
                "probabilities": result.as_numpy("PROBABILITIES").tolist(), "label": text("LABEL"),
                "decision": text("DECISION"), "reason": text("REASON")}

    seen.update(_infer_all(client, triton, headers, files, outputs))
    only_label = client.infer("lymphoblast", encoded(files[0].read_bytes()), headers=headers,
                              outputs=[triton.InferRequestedOutput("LABEL")])
    seen["only_label"] = [o.name for o in only_label.get_response().outputs]

    # A stream of 20 images, the eighth not an image: one response each, in order, the bad one in-band.
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)  # keywords
    for i in range(20):
        data = b"not an image" if i == 7 else files[i % len(files)].read_bytes()
        client.async_stream_infer("lymphoblast", encoded(data), request_id=f"cell-{i}")
    stream = []
    for _ in range(20):
        result, failure = answers.get(timeout=60)
        stream.append({"error": failure.message()} if failure is not None else outputs(result))
    client.stop_stream()
    seen["stream"] = stream
    seen["stream_files"] = [files[i % len(files)].name for i in range(20)]

    one = encoded(files[0].read_bytes())
    seen["unknown_model"] = error(lambda: client.infer("no-such-model", one, headers=headers))
    seen["unknown_version"] = error(lambda: client.infer("lymphoblast", one, model_version="9.9.9", headers=headers))
    seen["no_token"] = error(lambda: client.infer("lymphoblast", one))
    seen["bad_token"] = error(lambda: client.infer("lymphoblast", one, headers={"authorization": "Bearer wrong"}))
    seen["not_allowed"] = error(lambda: client.infer("lymphoblast", one, headers={"authorization": f"Bearer {other_token}"}))
    seen["not_allowed_metadata"] = error(lambda: client.get_model_metadata(
        "lymphoblast", headers={"authorization": f"Bearer {other_token}"}))
    seen["too_many"] = error(lambda: client.infer("lymphoblast", encoded(*[files[0].read_bytes()] * 17), headers=headers))
    client.close()
    out.write_text(json.dumps(seen))


def drive_http(url: str, token: str, other_token: str, cells: Path, out: Path) -> None:
    """The REST binding, as tritonclient.http speaks it (binary tensors by default)."""
    import tritonclient.http as triton

    headers = {"Authorization": f"Bearer {token}"}
    client = triton.InferenceServerClient(url)
    files = sorted(cells.glob("*.png"))
    seen: dict = _metadata(client, headers)
    encoded, error = (lambda *datas: _encoded(triton, *datas)), _error

    def outputs(result) -> dict:
        text = lambda name: [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy(name).reshape(-1)]  # noqa: E731
        response = result.get_response()
        return {"model_version": response["model_version"], "id": response.get("id", ""),
                "weights_sha256": response["parameters"]["weights_sha256"],
                "probabilities": result.as_numpy("PROBABILITIES").tolist(), "label": text("LABEL"),
                "decision": text("DECISION"), "reason": text("REASON")}

    seen.update(_infer_all(client, triton, headers, files, outputs))
    as_json = client.infer("lymphoblast", encoded(files[0].read_bytes()), headers=headers, outputs=[
        triton.InferRequestedOutput(name, binary_data=False) for name in ("PROBABILITIES", "LABEL", "DECISION", "REASON")])
    seen["json_outputs"] = outputs(as_json)
    seen["json_response"] = as_json.get_response()
    one = encoded(files[0].read_bytes())
    seen["unknown_model"] = error(lambda: client.infer("no-such-model", one, headers=headers))
    seen["unknown_version"] = error(lambda: client.infer("lymphoblast", one, model_version="9.9.9", headers=headers))
    seen["no_token"] = error(lambda: client.infer("lymphoblast", one))
    seen["bad_token"] = error(lambda: client.infer("lymphoblast", one, headers={"Authorization": "Bearer wrong"}))
    seen["not_allowed"] = error(lambda: client.infer("lymphoblast", one, headers={"Authorization": f"Bearer {other_token}"}))
    seen["too_many"] = error(lambda: client.infer("lymphoblast", encoded(*[files[0].read_bytes()] * 17), headers=headers))
    seen["not_an_image"] = error(lambda: client.infer("lymphoblast", encoded(b"not an image"), headers=headers))
    client.close()
    out.write_text(json.dumps(seen))


if __name__ == "__main__":
    if sys.argv[1] == "descriptors":
        descriptors(Path(sys.argv[2]))
    elif sys.argv[1] == "drive-http":
        drive_http(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]), Path(sys.argv[6]))
    else:
        drive(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]), Path(sys.argv[6]))
