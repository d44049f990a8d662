"""The Open Inference Protocol's HTTP/REST binding (KServe v2, as Triton and MLServer serve it)
beside gRPC, on `http_port` of the listen host, on the server's event loop (aiohttp).

Nothing here classifies or decides who may call: each request is translated to the
`inference.GRPCInferenceService` message it stands for and answered by the same
`InferenceService` methods, after the same identity and limits as a gRPC call
(`CallerInterceptor.identify_by` / `admit`); refusals are counted and recorded by the same
`Refusals`. So the bearer tokens, client certificates, limits, audit rows (method "HTTP
ModelInfer"), results and error reasons are gRPC's. Routes (`{v}` is optional, as
`/versions/{v}`):

    GET  /v2/health/live               200 {"live": true}
    GET  /v2/health/ready              200 {"ready": true}, or 503 while not (as gRPC health's "")
    GET  /v2                           server metadata
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready    200 or 503 {"name", "ready"}
    GET  /v2/models/{name}[/versions/{v}]/config   Triton's model configuration (JSON)
    POST /v2/models/{name}[/versions/{v}]/infer    inference

Inference takes the protocol's JSON, and Triton's binary tensor extension (an
`Inference-Header-Content-Length` header, each input's bytes after the JSON with
`parameters.binary_data_size`), which tritonclient.http sends by default. In JSON, an IMAGE
element is an image file in base64; PIXELS are integers. Outputs come back as JSON, or as binary
after the JSON header when the request asks for it (`binary_data_output`, or an output's
`binary_data`). An error is `{"error": message, "code": gRPC code, "reason", "details"}` with the
HTTP status for the gRPC code (`STATUS`). docs/open-inference.md documents it for callers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format

from . import __version__, errors
from .auth import CALLER, CallerInterceptor, refusal_reason
from .config import TRANSPORT_FACTOR, Settings
from .inference import OFF_LOOP_BYTES, PLATFORM, InferenceService, deserialize_bytes, serialize_bytes
from .oip import grpc_service_pb2 as oip

log = logging.getLogger("dxserve.rest")

#: The HTTP status of each gRPC code an answer can carry.
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
HEADER_LENGTH = "Inference-Header-Content-Length"
METHOD = "HTTP ModelInfer"  # the audit rows' method


def error_response(error: errors.ServingError) -> web.Response:
    """The JSON error of a ServingError: its message, gRPC code, ErrorInfo reason, and every typed detail."""
    info = next((d for d in error.details if d.DESCRIPTOR.name == "ErrorInfo"), None)
    body = {"error": error.message, "code": error.code.name, "reason": info.reason if info else "",
            "details": [{"@type": d.DESCRIPTOR.full_name, **json_format.MessageToDict(d)} for d in error.details]}
    headers = {}
    retry = next((d for d in error.details if d.DESCRIPTOR.name == "RetryInfo"), None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9)))
    status = 413 if body["reason"] == "MESSAGE_TOO_LARGE" else STATUS.get(error.code, 500)
    return web.json_response(body, status=status, headers=headers)


def invalid(message: str) -> errors.ServingError:
    return errors.invalid_field("body", "REQUEST_INVALID", message)


def _parameter(message, name: str, value) -> None:
    """A JSON parameter as the protocol's InferParameter (its type from the JSON value's)."""
    target = message.parameters[name]
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise invalid(f"parameter {errors.clip(name)!r} must be a string, number or boolean")


def _shape(tensor: dict, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f"input {errors.clip(name)!r}: shape must be a list of integers")
    return shape


def _json_contents(tensor: dict, name: str, shape: list[int]) -> bytes:
    """A JSON input's `data` as the raw contents gRPC's raw_input_contents would carry."""
    data = tensor.get("data")
    if not isinstance(data, list):
        raise invalid(f"input {errors.clip(name)!r} needs `data` (a list) or parameters.binary_data_size")
    elements = list(_flatten(data))
    expected = int(np.prod(shape)) if shape else 0
    if len(elements) != expected:
        raise invalid(f"input {errors.clip(name)!r} holds {len(elements)} elements; its shape {shape} says {expected}")
    if tensor.get("datatype") == "BYTES":
        try:
            return serialize_bytes([base64.b64decode(e, validate=True) for e in elements])
        except (binascii.Error, TypeError, ValueError):
            raise invalid(f"input {errors.clip(name)!r}: in JSON, each BYTES element is an image file in base64") from None
    if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e <= 255 for e in elements):
        raise invalid(f"input {errors.clip(name)!r}: UINT8 elements are integers from 0 to 255")
    return np.asarray(elements, dtype=np.uint8).tobytes()


def _flatten(data):
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def infer_request(name: str, version: str, header: dict, binary: bytes) -> oip.ModelInferRequest:
    """The ModelInferRequest a REST inference request stands for, or ServingError(INVALID_ARGUMENT)."""
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise invalid("the request is a JSON object with `inputs` (a list of tensors)")
    request = oip.ModelInferRequest(model_name=name, model_version=version, id=str(header.get("id", "")))
    for key, value in (header.get("parameters") or {}).items():
        _parameter(request, key, value)
    offset, raw = 0, []
    for tensor in header["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise invalid("each input is an object with a `name`, `shape` and `datatype`")
        shape = _shape(tensor, tensor["name"])
        request.inputs.add(name=tensor["name"], datatype=str(tensor.get("datatype", "")), shape=shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(f"input {errors.clip(tensor['name'])!r}: binary_data_size {size!r} does not fit the "
                              f"{len(binary) - offset} bytes after the JSON header")
            raw.append(binary[offset:offset + size])
            offset += size
        elif any(d <= 0 for d in shape):
            raw.append(b"")  # inference.images names the bad dimension
        else:
            raw.append(_json_contents(tensor, tensor["name"], shape))
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    request.raw_input_contents.extend(raw)
    for output in header.get("outputs") or []:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise invalid("each requested output is an object with a `name`")
        request.outputs.add(name=output["name"])
    return request


def parse_body(name: str, version: str, body: bytes, header_length: str | None) -> tuple[dict, oip.ModelInferRequest]:
    """(the JSON header, the ModelInferRequest) of a REST inference body: all JSON, or (Triton's
    binary extension) `header_length` bytes of JSON, then the inputs' bytes; or ServingError."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise invalid(f"{HEADER_LENGTH} {errors.clip(header_length)!r} is not a length within the body's {len(body)} bytes")
        text, binary = body[:int(header_length)], body[int(header_length):]
    else:
        text, binary = body, b""
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(f"the request is not JSON: {error}") from None
    return header, infer_request(name, version, header, binary)


def infer_response(response: oip.ModelInferResponse, header: dict) -> web.Response:
    """The REST answer of a ModelInferResponse: JSON data, or binary after the header where asked."""
    everything_binary = bool((header.get("parameters") or {}).get("binary_data_output"))
    binary_wanted = {o.get("name"): bool((o.get("parameters") or {}).get("binary_data", everything_binary))
                     for o in header.get("outputs") or [] if isinstance(o, dict)}
    outputs, chunks = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        out = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary_wanted.get(tensor.name, everything_binary):
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "FP32":
            out["data"] = np.frombuffer(raw, dtype="<f4").astype(float).tolist()
        else:
            out["data"] = [e.decode() for e in deserialize_bytes(raw, int(np.prod(tensor.shape)))]
        outputs.append(out)
    body = {"model_name": response.model_name, "model_version": response.model_version, "id": response.id,
            "parameters": {k: v.string_param for k, v in response.parameters.items()}, "outputs": outputs}
    text = json.dumps(body).encode()
    if not chunks:
        return web.Response(body=text, content_type="application/json")
    return web.Response(body=text + b"".join(chunks), headers={HEADER_LENGTH: str(len(text)),
                                                               "Content-Type": "application/octet-stream"})


class RestDoor:
    """The REST binding of `inference` behind `callers`' identity and limits (see the module)."""

    def __init__(self, inference: InferenceService, callers: CallerInterceptor, settings: Settings):
        self.inference, self.callers, self.settings = inference, callers, settings
        # The transport takes TRANSPORT_FACTOR times the per-request limit (as gRPC's): base64 and JSON
        # cost a third more than the image, which the service checks against max_message_bytes.
        self.max_body = TRANSPORT_FACTOR * settings.max_message_bytes
        self.app = web.Application(client_max_size=self.max_body)
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        self.app.add_routes([
            web.get("/v2/health/live", self.live), web.get("/v2/health/ready", self.ready), web.get("/v2", self.server),
            *(route for prefix in (model, versioned) for route in (
                web.get(prefix, self.call(self.model_metadata)), web.get(prefix + "/ready", self.call(self.model_ready)),
                web.get(prefix + "/config", self.call(self.model_config)),
                web.post(prefix + "/infer", self.call(self.infer, counted=True)))),
        ])
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen on host:port (0: a free one); the bound port."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=tls, reuse_port=self.settings.reuse_port or None)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {error.strerror or error}") from None
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop listening; requests in flight get `grace_s` to finish."""
        if self._runner is not None:
            self._runner._shutdown_timeout = grace_s  # aiohttp reads it at cleanup; the constructor is too early
            await self._runner.cleanup()

    # Probes: open and uncounted exactly as gRPC health is (settings.auth_open_health).

    async def live(self, request: web.Request) -> web.Response:
        return await self._probe(request, lambda: web.json_response({"live": True}))

    async def ready(self, request: web.Request) -> web.Response:
        return await self._probe(request, lambda: web.json_response({"ready": self.inference.ready()},
                                                                   status=200 if self.inference.ready() else 503))

    async def _probe(self, request: web.Request, answer: Callable[[], web.Response]) -> web.Response:
        if not self.settings.auth_open_health:
            try:
                self._identify(request)
            except errors.ServingError as refusal:
                self.callers.refusals.refused(refusal_reason(refusal), self._peer(request), refusal)
                return error_response(refusal)
        return answer()

    def call(self, handler: Callable[[web.Request], Awaitable[web.Response]], counted: bool = False):
        """`handler` behind identity, the caller's rights (in CALLER) and, when `counted`, the call limits."""

        async def wrapped(request: web.Request) -> web.Response:
            try:
                caller = self._identify(request)
                self.callers.admit(caller, streaming=False, counted=counted)
            except errors.ServingError as refusal:
                self.callers.refusals.refused(refusal_reason(refusal), self._peer(request), refusal)
                return error_response(refusal)
            token = CALLER.set(caller)  # a kept-alive connection serves its requests in one task: reset after each
            try:
                return await handler(request)
            except errors.ServingError as error:
                return error_response(error)
            finally:
                CALLER.reset(token)
                self.callers.release(caller, streaming=False, counted=counted)

        return wrapped

    async def server(self, request: web.Request) -> web.Response:
        return await self.call(self._server_metadata)(request)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": PLATFORM, "version": __version__, "extensions": ["binary_tensor_data",
                                                                                          "model_configuration"]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        metadata = self.inference.metadata(*self._model(request))
        tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
        return web.json_response({"name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
                                  "inputs": [tensor(t) for t in metadata.inputs],
                                  "outputs": [tensor(t) for t in metadata.outputs]})

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        ready = self.inference.model_ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        config = json_format.MessageToDict(self.inference.config(*self._model(request)), preserving_proto_field_name=True)
        for tensors in (config.get("input", []), config.get("output", [])):
            for tensor in tensors:
                tensor["dims"] = [int(d) for d in tensor.get("dims", [])]  # int64 are strings in proto JSON
        return web.json_response(config)

    async def infer(self, request: web.Request) -> web.Response:
        """A request that cannot be read (too large, not JSON, malformed tensors) is answered and
        recorded like any refused image, as over gRPC (`InferenceService.infer`'s `refused`)."""
        name, version = self._model(request)
        header: dict = {}
        # Held from its declared length, before a byte is read: past max_inflight_mb, refused unread. A
        # body of no declared length (chunked) is held at the most it may be, max_body.
        declared = request.content_length if request.content_length is not None else self.max_body
        with self.inference.diagnostics.inflight.holding(declared) as full:
            try:
                if full:
                    raise full
                try:
                    body = await request.read()
                except web.HTTPRequestEntityTooLarge:  # read no further than the limit, then say so in our words
                    raise errors.message_too_large(request.content_length or 0, self.max_body) from None
                length = request.headers.get(HEADER_LENGTH)
                if len(body) < OFF_LOOP_BYTES:  # as over gRPC: a thread hop costs more than a small parse
                    header, message = parse_body(name, version, body, length)
                else:  # off the event loop: a large JSON body takes a while to parse (issue 32)
                    header, message = await asyncio.to_thread(parse_body, name, version, body, length)
                refused = None
            except errors.ServingError as error:
                message, refused = oip.ModelInferRequest(model_name=name, model_version=version), error
            outcome = await self.inference.infer(message, None, METHOD, refused)
        if isinstance(outcome, errors.ServingError):  # answered, not raised: raised, it would hold this frame and its body
            return error_response(outcome)
        return infer_response(outcome, header)

    def _model(self, request: web.Request) -> tuple[str, str]:
        return request.match_info["name"], request.match_info.get("version", "")

    def _identify(self, request: web.Request):
        def subject() -> str:
            certificate = request.transport.get_extra_info("peercert") if request.transport else None
            return ",".join(f"{k}={v}" for rdn in reversed((certificate or {}).get("subject", ())) for k, v in rdn) \
                if certificate else ""

        return self.callers.identify_by(request.headers.get("Authorization", ""), subject, self._peer(request))

    @staticmethod
    def _peer(request: web.Request) -> str:
        return request.remote or "unknown"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP door's TLS: the gRPC port's certificate, key and (mutual TLS) client CA."""
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
