"""The Open Inference Protocol v2 (`inference.GRPCInferenceService`, as KServe and Triton speak
it) beside dxserve.v1, on the same port: models are plugins, a model's versions are the
plugin's model versions.

Nothing here classifies: every image of a ModelInfer request becomes a dxserve.v1
ClassifyRequest answered by `DiagnosticsService.answer`, so the same registry, batcher, quality
gate, decision rule, limits, auth interceptor and audit trail (one row per image, method
"ModelInfer" or "ModelStreamInfer") apply. This module only translates tensors; the mapping
is documented in docs/open-inference.md.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from . import __version__, auth, errors, registry
from .oip import grpc_service_pb2 as oip
from .oip import grpc_service_pb2_grpc as oip_grpc
from .registry import PluginEntry
from .service import DiagnosticsService
from .streams import requests_while_open
from .v1 import diagnostics_pb2 as pb

PLATFORM = "dxserve"
IMAGE, PIXELS = "IMAGE", "PIXELS"  # the two inputs: encoded image files, or raw RGB pixels
PROBABILITIES, LABEL, DECISION, REASON = "PROBABILITIES", "LABEL", "DECISION", "REASON"
OFF_LOOP_BYTES = 1 << 20  # requests at least this large are parsed in a worker thread
OFF_LOOP_ELEMENTS = 1 << 16  # typed tensor elements past which the conversion runs in a worker thread
#: Request parameters dxserve reads; those of the protocol's clients it accepts and ignores.
PARAMETERS = {"specimen_id", "weights_sha256"}
IGNORED_PARAMETERS = {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output",
                      "triton_enable_empty_final_response", "headers"}


def tensors(labels: list[str]) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) as (name, datatype, shape with the batch dimension -1) for a plugin's labels."""
    inputs = [(IMAGE, "BYTES", [-1, 1]), (PIXELS, "UINT8", [-1, -1, -1, 3])]
    outputs = [(PROBABILITIES, "FP32", [-1, len(labels)]), (LABEL, "BYTES", [-1, 1]), (DECISION, "BYTES", [-1, 1]),
               (REASON, "BYTES", [-1, 1])]
    return inputs, outputs


CONFIG_TYPES = {"BYTES": oip.TYPE_STRING, "UINT8": oip.TYPE_UINT8, "FP32": oip.TYPE_FP32}


def size_of(raw: bytes | oip.ModelInferRequest) -> int:
    """A request's bytes, as it came (`add_to_server`) or parsed."""
    return len(raw) if isinstance(raw, bytes) else raw.ByteSize()


def invalid(message: str) -> errors.ServingError:
    return errors.invalid_field("inputs", "TENSOR_INVALID", message)


def serialize_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element prefixed by its length (4 bytes, little-endian)."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes, count: int) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if len(elements) == count:  # stop at the shape's count, not after millions more
            raise invalid(f"the BYTES contents hold more than the {count} elements the shape says")
        if offset + 4 > len(raw):
            raise invalid("BYTES contents end inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise invalid(f"BYTES element {len(elements)} claims {size} bytes; only {len(raw) - offset} remain")
        elements.append(raw[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise invalid(f"the BYTES contents hold {len(elements)} elements; the shape says {count}")
    return elements


def images(request: oip.ModelInferRequest, max_batch: int) -> list[pb.Image]:
    """The request's images, one per batch element, or ServingError(INVALID_ARGUMENT)."""
    if len(request.inputs) != 1:
        raise invalid(f"send exactly one input, {IMAGE} (encoded image files, BYTES [N, 1]) or {PIXELS} "
                      f"(UINT8 [N, H, W, 3]); got {len(request.inputs)}")
    tensor = request.inputs[0]
    if request.raw_input_contents and (len(request.raw_input_contents) != 1 or tensor.HasField("contents")):
        raise invalid("raw_input_contents must hold one entry per input, and no input may also carry contents")
    shape = list(tensor.shape)
    if any(d <= 0 for d in shape):
        raise invalid(f"input {tensor.name!r} has shape {shape}: every dimension must be positive")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if tensor.name == IMAGE:
        if tensor.datatype != "BYTES" or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise invalid(f"{IMAGE} is BYTES of shape [N] or [N, 1]; got {tensor.datatype} {shape}")
        count = shape[0]
        _check_batch(count, max_batch)
        # Counted before anything is copied out (issue 32: millions of empty elements under a shape of [1]).
        if raw is None and len(tensor.contents.bytes_contents) != count:
            raise invalid(f"{IMAGE} holds {len(tensor.contents.bytes_contents)} elements; its shape says {count}")
        files = deserialize_bytes(raw, count) if raw is not None else list(tensor.contents.bytes_contents)
        return [pb.Image(encoded=f) for f in files]
    if tensor.name == PIXELS:
        if tensor.datatype != "UINT8" or len(shape) not in (3, 4):
            raise invalid(f"{PIXELS} is UINT8 of shape [N, H, W, C] or [H, W, C]; got {tensor.datatype} {shape}")
        count, (height, width, channels) = (1 if len(shape) == 3 else shape[0]), shape[-3:]
        _check_batch(count, max_batch)
        size = height * width * channels
        if raw is None:
            if len(tensor.contents.uint_contents) != count * size:
                raise invalid(f"{PIXELS} of shape {shape} needs {count * size} values; got {len(tensor.contents.uint_contents)}")
            values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
            if values.size and values.max() > 255:
                raise invalid(f"{PIXELS} is UINT8: a value of {int(values.max())} is out of range")
            raw = values.astype(np.uint8).tobytes()
        if len(raw) != count * size:
            raise invalid(f"{PIXELS} of shape {shape} needs {count * size} bytes; got {len(raw)}")
        return [pb.Image(raw=pb.RawImage(pixels=raw[i * size:(i + 1) * size], width=width, height=height,
                                         channels=channels)) for i in range(count)]
    raise invalid(f"unknown input {errors.clip(tensor.name)!r} (inputs: {IMAGE}, {PIXELS})")


def _check_batch(count: int, max_batch: int) -> None:
    if count > max_batch:
        raise invalid(f"{count} images in one request; this model's max_batch_size is {max_batch}")


def parameters(request: oip.ModelInferRequest) -> dict[str, str]:
    """The request parameters dxserve reads, or ServingError(INVALID_ARGUMENT) for one it does not know."""
    read = {}
    for name, value in request.parameters.items():
        if name in IGNORED_PARAMETERS:
            continue
        if name not in PARAMETERS:
            raise errors.invalid_field("parameters", "PARAMETER_UNKNOWN", f"unknown parameter {errors.clip(name)!r} "
                                       f"(known: {', '.join(sorted(PARAMETERS))})")
        if value.WhichOneof("parameter_choice") != "string_param":
            raise errors.invalid_field("parameters", "PARAMETER_INVALID", f"parameter {name!r} is a string")
        read[name] = value.string_param
    return read


def outputs_wanted(request: oip.ModelInferRequest, labels: list[str]) -> list[tuple[str, str, list[int]]]:
    declared = tensors(labels)[1]
    if not request.outputs:
        return declared
    by_name = {name: (name, kind, shape) for name, kind, shape in declared}
    unknown = [o.name for o in request.outputs if o.name not in by_name]
    if unknown:
        raise errors.invalid_field("outputs", "OUTPUT_UNKNOWN", f"unknown output {errors.clip(unknown[0])!r} "
                                   f"(outputs: {', '.join(by_name)})")
    return [by_name[o.name] for o in request.outputs]


def response(request: oip.ModelInferRequest, results: list[pb.ClassifyResponse], wanted) -> oip.ModelInferResponse:
    """The ModelInferResponse of one request's results, its outputs as raw contents."""
    first = results[0]
    message = oip.ModelInferResponse(model_name=first.plugin, model_version=first.model_version, id=request.id)
    message.parameters["weights_sha256"].string_param = first.weights_sha256
    count = len(results)
    for name, kind, shape in wanted:
        if name == PROBABILITIES:
            data = np.array([[p.probability for p in r.probabilities] for r in results], dtype="<f4").tobytes()
        else:
            data = serialize_bytes([{LABEL: r.top_label, DECISION: r.decision.label,
                                     REASON: r.decision.reason}[name].encode() for r in results])
        message.outputs.add(name=name, datatype=kind, shape=[count, *shape[1:]])
        message.raw_output_contents.append(data)
    return message


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over `diagnostics`' plugins; `ready()`: whether the server gives results now."""

    def __init__(self, diagnostics: DiagnosticsService, ready: Callable[[], bool]):
        self.diagnostics = diagnostics
        self.plugins = diagnostics.plugins
        self.settings = diagnostics.settings
        self.ready = ready

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.ready())

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=PLATFORM, version=__version__)

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=await self._answer(self.model_ready, request, context))

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        return await self._answer(self.metadata, request, context)

    async def ModelConfig(self, request: oip.ModelConfigRequest, context) -> oip.ModelConfigResponse:
        return oip.ModelConfigResponse(config=await self._answer(self.config, request, context))

    # What the protocol's model calls answer, for the gRPC methods above and the REST binding (rest.py).

    def model_ready(self, name: str, version: str) -> bool:
        entry, version = self.model(name, version)
        return self.ready() and entry.state == registry.READY and entry.servable(version)

    def metadata(self, name: str, version: str) -> oip.ModelMetadataResponse:
        entry, _ = self.model(name, version)
        inputs, outputs = tensors(list(entry.info.labels))
        metadata = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=entry.name, versions=[v.version for v in entry.versions], platform=PLATFORM,
            inputs=[metadata(name=n, datatype=k, shape=s) for n, k, s in inputs],
            outputs=[metadata(name=n, datatype=k, shape=s) for n, k, s in outputs])

    def config(self, name: str, version: str) -> oip.ModelConfig:
        entry, _ = self.model(name, version)
        inputs, outputs = tensors(list(entry.info.labels))
        return oip.ModelConfig(
            name=entry.name, platform=PLATFORM, backend=PLATFORM, max_batch_size=self.settings.max_batch_size,
            input=[oip.ModelInput(name=n, data_type=CONFIG_TYPES[k], dims=s[1:], optional=True) for n, k, s in inputs],
            output=[oip.ModelOutput(name=n, data_type=CONFIG_TYPES[k], dims=s[1:]) for n, k, s in outputs])

    @staticmethod
    async def _answer(method: Callable, request, context):
        try:
            return method(request.name, request.version)
        except errors.ServingError as error:
            return error.end(context)

    async def parsed(self, raw: bytes | oip.ModelInferRequest) -> tuple[oip.ModelInferRequest, errors.ServingError | None]:
        """A request as it came (`add_to_server` registers ModelInfer and ModelStreamInfer for their
        bytes): one over max_message_bytes is refused before it is parsed (a tensor of millions of
        elements costs its parse, issue 32), the others parsed off the event loop; (request, refusal)."""
        if isinstance(raw, oip.ModelInferRequest):
            return raw, None
        if len(raw) > self.settings.max_message_bytes:
            return oip.ModelInferRequest(), errors.message_too_large(len(raw), self.settings.max_message_bytes)
        try:
            if len(raw) < OFF_LOOP_BYTES:  # a thread hop costs more than a small parse
                return oip.ModelInferRequest.FromString(raw), None
            return await asyncio.to_thread(oip.ModelInferRequest.FromString, raw), None
        except DecodeError:
            return oip.ModelInferRequest(), invalid("the request is not a ModelInferRequest message")

    async def ModelInfer(self, raw: bytes, context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        with self.diagnostics.inflight.holding(size_of(raw)) as full:  # past max_inflight_mb: refused unparsed
            request, refused = (oip.ModelInferRequest(), full) if full else await self.parsed(raw)
            outcome = await self.infer(request, context.time_remaining(), "ModelInfer", refused)
        if isinstance(outcome, errors.ServingError):
            return outcome.end(context)
        return outcome

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[oip.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[oip.ModelStreamInferResponse]:
        # As ClassifyStream: requests run concurrently (they share batches), a bounded window
        # stops reading from a caller that sends faster than the model answers, and the
        # responses go back in request order, each error in its own response.
        window: asyncio.Queue[tuple[asyncio.Future, oip.ModelInferRequest] | None] = asyncio.Queue(self.settings.stream_window)
        ended: list[tuple[str, str, float]] = []  # the idle, rate or age limit that ended it (issue 32: they hold here too)
        answered = 0
        inflight = self.diagnostics.inflight

        async def read() -> None:
            try:
                async for raw in requests_while_open(request_iterator, self.settings, ended, self.diagnostics.crowded):
                    size, item = size_of(raw), None
                    await inflight.take(size)  # past max_inflight_mb, read no further until some is answered
                    try:
                        request, refused = await self.parsed(raw)
                        item = asyncio.ensure_future(self.infer(request, context.time_remaining(), "ModelStreamInfer", refused))
                    finally:
                        inflight.until_done(item, size)
                    try:
                        await window.put((item, request))
                    except asyncio.CancelledError:
                        item.cancel()
                        raise
            finally:
                await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (entry := await window.get()) is not None:
                item, request = entry
                outcome = await item
                if isinstance(outcome, errors.ServingError):
                    yield oip.ModelStreamInferResponse(error_message=outcome.message, infer_response=oip.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id))
                else:
                    yield oip.ModelStreamInferResponse(infer_response=outcome)
                answered += 1
            if ended:
                errors.stream_ended(ended[0][0], answered, *ended[0][1:]).end(context)
                return
            try:
                await reader
            except errors.ServingError as refusal:  # e.g. the caller's token was revoked mid-stream
                refusal.end(context)
                return
        finally:
            reader.cancel()
            while not window.empty():
                if (entry := window.get_nowait()) is not None:
                    entry[0].cancel()

    def model(self, name: str, version: str) -> tuple[PluginEntry, str]:
        """The plugin and version a model call names, or ServingError NOT_FOUND / PERMISSION_DENIED / UNAVAILABLE."""
        auth.authorize(name)
        entry = self.plugins.get(name)
        if entry is None:
            raise errors.unknown_plugin(name, self.plugins)
        if entry.info is None:
            raise errors.unavailable(entry.name, f"model {entry.name!r} failed to load: {entry.reason}", "PLUGIN_FAILED")
        version = version or auth.CALLER.get().default_version(entry.name) or entry.default_version
        if all(v.version != version for v in entry.versions):
            raise errors.unknown_version(entry.name, version, [v.version for v in entry.versions])
        return entry, version

    async def infer(self, request: oip.ModelInferRequest, timeout: float | None, method: str,
                    refused: errors.ServingError | None = None) -> oip.ModelInferResponse | errors.ServingError:
        """The response, or the error to answer (the first image's that failed, naming it);
        `refused`: why the request cannot be read at all (answered and recorded the same way)."""
        request_id = request.id or str(uuid.uuid4())
        try:
            if refused is not None:
                raise refused
            given = parameters(request)
            # Off the event loop when the tensor's elements are many (pixels sent as integers take a
            # while to convert); a thread hop costs more than converting a few.
            typed = sum(len(t.contents.uint_contents) + len(t.contents.bytes_contents) for t in request.inputs)
            pictures = (await asyncio.to_thread(images, request, self.settings.max_batch_size) if typed > OFF_LOOP_ELEMENTS
                        else images(request, self.settings.max_batch_size))
            entry = self.plugins.get(request.model_name)
            wanted = outputs_wanted(request, list(entry.info.labels)) if entry is not None and entry.info else []
            refused = None
        except errors.ServingError as error:  # answered and recorded like any refused image
            given, pictures, wanted, refused = {}, [None], [], error
        ids = [request_id] if len(pictures) == 1 else [f"{request_id}/{i}" for i in range(len(pictures))]
        asked = [pb.ClassifyRequest(request_id=i, plugin=request.model_name, model_version=request.model_version,
                                    image=p, specimen_id=given.get("specimen_id", ""),
                                    weights_sha256=given.get("weights_sha256", "")) for i, p in zip(ids, pictures, strict=True)]
        outcomes = await asyncio.gather(*(self.diagnostics.answer(a, i, timeout, method, refused=refused)
                                          for a, i in zip(asked, ids, strict=True)))
        failed = next(((i, o) for i, o in enumerate(outcomes) if isinstance(o, errors.ServingError)), None)
        if failed is not None:
            index, error = failed
            if len(outcomes) > 1:
                error = errors.ServingError(error.code, f"image {index} of {len(outcomes)}: {error.message}", *error.details)
            return error
        return response(request, outcomes, wanted)


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    """The generated registration, except that ModelInfer and ModelStreamInfer are handed their
    requests' bytes, for `InferenceService.parsed` to check their size before parsing them."""
    handlers: dict = {}

    class Capture:  # what the generated function registers, kept
        def add_generic_rpc_handlers(self, generic) -> None:
            pass

        def add_registered_method_handlers(self, name: str, methods: dict) -> None:
            handlers.update(methods)

    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, Capture())
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        service.ModelInfer, response_serializer=handlers["ModelInfer"].response_serializer)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        service.ModelStreamInfer, response_serializer=handlers["ModelStreamInfer"].response_serializer)
    name = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
