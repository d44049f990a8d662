"""A typed Python client over the generated dxserve.v1 stubs."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import grpc
import numpy as np
from grpc_status import rpc_status

from dxserve.v1 import diagnostics_pb2 as pb
from dxserve.v1 import diagnostics_pb2_grpc as pb_grpc

DEFAULT_SERVER = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SEND_FACTOR = 4  # the server's transport takes 4x its max_message_bytes (dxserve.app.TRANSPORT_FACTOR)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}  # google.rpc.Code number -> grpc.StatusCode

#: What counts as an image file when folders are given (the server decodes these formats).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}

# A path, encoded file bytes, or a uint8 array (H, W), (H, W, 1|3|4).
ImageInput = Union[str, Path, bytes, np.ndarray]


@dataclass(frozen=True)
class Specimen:
    """A specimen's summary within one stream (decision support, not a diagnosis)."""

    specimen_id: str
    plugin: str
    model_version: str
    cells_seen: int
    cells_failed: int
    cells_passed_gate: int
    indeterminate: int
    labels: dict[str, tuple[int, float, float, float]]  # label -> (count, fraction of called cells, 95 % CI low, high)
    call: str  # the plugin's specimen-level label, "indeterminate", or "" when it makes no such call
    call_reason: str
    rule: str
    final: bool  # sent after the stream's last item

    @classmethod
    def from_proto(cls, s: pb.SpecimenSummary) -> "Specimen":
        return cls(s.specimen_id, s.plugin, s.model_version, s.cells_seen, s.cells_failed, s.cells_passed_gate, s.indeterminate,
                   {f.label: (f.count, f.fraction, f.ci_low, f.ci_high) for f in s.labels}, s.decision.label,
                   s.decision.reason, s.decision.rule, s.final)


@dataclass(frozen=True)
class FieldCounts:
    """What a field plugin found in one image (Result.field)."""

    found: int
    classified: int  # given a label by the objects plugin
    indeterminate: int  # answered, but left undecided (its gate, out of distribution, or its rule)
    failed: int  # could not be classified (the object's Result carries the error)
    objects_plugin: str
    objects_model_version: str


@dataclass(frozen=True)
class Found:
    """One object a field plugin found (Result.objects), with its own result."""

    index: int
    box: tuple[int, int, int, int]  # x, y, width, height in the field's pixels
    plugin: str  # the plugin that classified it
    result: "Result"  # its classification; `ok` False with the error when it could not be classified
    mask_png: bytes = b""  # 8-bit grey PNG of the box's size, 255 = the object


@dataclass(frozen=True)
class Explanation:
    """What drove a result's score: PNGs of the image's size."""

    method: str
    label: str  # the label whose score it explains
    heatmap_png: bytes  # 8-bit grey, 255 = drove the score most
    overlay_png: bytes  # the heatmap blended over the image


@dataclass(frozen=True)
class Result:
    """The outcome for one image: a classification, or an error (then `ok` is False)."""

    request_id: str
    plugin: str = ""
    model_version: str = ""
    weights_sha256: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    top_label: str = ""
    confidence: float = 0.0
    decision: str = ""
    indeterminate: bool = False
    reason: str = ""
    screen_positive: bool = False  # reaches the plugin's high-sensitivity screening threshold: review
    rule: str = ""  # the plugin's versioned decision rule, in words
    quality_passed: bool = True  # the plugin's input quality gate; False: the decision is indeterminate
    quality_issues: tuple = ()  # the gate's failed checks: (code, message) pairs
    queued_ms: float = 0.0
    model_ms: float = 0.0
    batch_size: int = 0
    error_code: str = ""  # a grpc.StatusCode name, e.g. "INVALID_ARGUMENT"
    error_message: str = ""
    error_details: tuple = ()  # the unpacked google.rpc detail messages
    specimen_id: str = ""
    specimen: Specimen | None = None  # in a stream: the running summary of this item's specimen, this item included
    explanation: Explanation | None = None  # when the request asked for one
    objects: tuple = ()  # a field plugin's objects (Found), each with its own Result
    field: FieldCounts | None = None  # a field plugin's counts of what it found
    audit_seq: int = 0  # the result's row in the server's audit trail; 0: the server keeps none
    input_sha256: str = ""  # SHA-256 of the image as the server received and recorded it

    @property
    def ok(self) -> bool:
        return not self.error_code

    @classmethod
    def from_response(cls, r: pb.ClassifyResponse) -> "Result":
        return cls(
            request_id=r.request_id, plugin=r.plugin, model_version=r.model_version, weights_sha256=r.weights_sha256,
            probabilities={p.label: p.probability for p in r.probabilities}, top_label=r.top_label,
            confidence=r.confidence, decision=r.decision.label, indeterminate=r.decision.indeterminate,
            reason=r.decision.reason, screen_positive=r.decision.screen_positive, rule=r.decision.rule,
            quality_passed=r.quality.passed if r.HasField("quality") else True,
            quality_issues=tuple((i.code, i.message) for i in r.quality.issues), queued_ms=r.timing.queued_ms, model_ms=r.timing.model_ms,
            batch_size=r.timing.batch_size, specimen_id=r.specimen_id, audit_seq=r.audit_seq, input_sha256=r.input_sha256,
            objects=tuple(Found(o.index, (o.box.x, o.box.y, o.box.width, o.box.height), o.plugin,
                                cls.from_response(o.result) if o.HasField("result")
                                else cls.from_status(f"{r.request_id}/{o.index}", o.error), o.mask_png) for o in r.objects),
            field=FieldCounts(r.field.found, r.field.classified, r.field.indeterminate, r.field.failed, r.field.objects_plugin,
                              r.field.objects_model_version) if r.HasField("field") else None,
            explanation=Explanation(r.explanation.method, r.explanation.label, r.explanation.heatmap_png,
                                    r.explanation.overlay_png) if r.HasField("explanation") else None,
        )

    @classmethod
    def from_status(cls, request_id: str, status) -> "Result":
        return cls(request_id=request_id, error_code=STATUS_CODES[status.code].name,
                   error_message=status.message, error_details=tuple(unpack_details(status)))


#: Codes with which a new stream, opened to resume one, is refused for now and tried again within resume_within_s.
RETRIED_WHILE_RESUMING = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


class DxServeError(Exception):
    """A failed unary call, with its status code and google.rpc details."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.details = code, message, details

    @property
    def reason(self) -> str:
        """The google.rpc.ErrorInfo reason, e.g. "VERSION_UNGATED", "QUEUE_FULL"; "" without one."""
        return next((d.reason for d in self.details if d.DESCRIPTOR.name == "ErrorInfo"), "")

    @property
    def resume_index(self) -> int | None:
        """For a stream the server ended with a resume point (a stopping server, SERVER_DRAINING;
        an idle, too slow or too old stream, STREAM_IDLE / STREAM_TOO_SLOW / STREAM_MAX_AGE): the first
        item it did not answer."""
        for detail in self.details:
            if detail.DESCRIPTOR.name == "ErrorInfo" and "resume_index" in detail.metadata:
                return int(detail.metadata["resume_index"])
        return None

    @property
    def retry_after_s(self) -> float:
        """The google.rpc.RetryInfo delay: how long the server asks to wait before trying again (0 without one)."""
        return retry_delay_s(self.details) or 0.0


def retry_delay_s(details) -> float | None:
    """The google.rpc.RetryInfo delay among `details`, in seconds; None without one."""
    info = next((d for d in details if d.DESCRIPTOR.name == "RetryInfo"), None)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9 if info is not None else None


def unpack_details(status) -> list:
    """google.rpc.Status details as messages (BadRequest, ErrorInfo, ...)."""
    from google.rpc import error_details_pb2

    known = {name: getattr(error_details_pb2, name) for name in
             ("BadRequest", "ErrorInfo", "ResourceInfo", "RetryInfo", "QuotaFailure", "PreconditionFailure", "DebugInfo")}
    out = []
    for any_detail in status.details:
        cls = known.get(any_detail.TypeName().rsplit(".", 1)[-1])
        if cls is not None:
            message = cls()
            any_detail.Unpack(message)
            out.append(message)
    return out


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def to_image(image: ImageInput) -> pb.Image:
    """Build the request's image from a path, file bytes or a uint8 array."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray)):
        return pb.Image(encoded=bytes(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"arrays must be uint8, got {array.dtype}; encode other depths as PNG or TIFF")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C), got shape {array.shape}")
    height, width, channels = array.shape
    return pb.Image(raw=pb.RawImage(pixels=np.ascontiguousarray(array).tobytes(), width=width, height=height, channels=channels))


class Client:
    """Connects to a dxserve server.

    >>> with Client("localhost:50051") as client:
    ...     result = client.classify("cell.png", plugin="lymphoblast")
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        root_certificates: bytes | None = None,
        tls: bool = False,
        client_certificate: tuple[bytes, bytes] | None = None,  # (private key, certificate chain) for mutual TLS
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: list[tuple[str, object]] | None = None,
        token: str | None = None,  # a bearer token from `dxserve tokens add`; use it over TLS only
        round_robin: bool = False,  # spread calls over every address the name resolves to (a headless Service)
    ):
        channel_options = [
            # Sends may exceed the server's per-request limit, as its transport's limit does (4x),
            # so an oversized item is refused by the server alone, with its details, and a stream
            # goes on: at the same limit the client's own transport ended the whole run (issue 31).
            ("grpc.max_send_message_length", SEND_FACTOR * max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *(options or []),
        ]
        if round_robin:  # e.g. "dns:///dxserve-headless.default.svc.cluster.local:50051"
            channel_options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})))
        if tls or root_certificates or client_certificate:
            key, chain = client_certificate or (None, None)
            credentials = grpc.ssl_channel_credentials(root_certificates, key, chain)
            self.channel = grpc.secure_channel(server, credentials, channel_options)
        else:
            self.channel = grpc.insecure_channel(server, channel_options)
        self.stub = pb_grpc.DiagnosticsServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_until_serving(self, plugin: str | None = None, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        """Block until grpc.health.v1 reports the server, or one plugin, SERVING.
        Raises TimeoutError after timeout_s."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        service = f"{SERVICE_NAME}/{plugin}" if plugin else ""
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet, or the plugin is not known yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service or 'server'} not SERVING after {timeout_s} s")
            time.sleep(poll_s)

    def wait_until_loaded(self, plugin: str, timeout_s: float = 60.0, poll_s: float = 0.5, on_wait=None) -> pb.PluginInfo:
        """Block while `plugin` is LOADING (just after a restart) and return its PluginInfo once it
        is READY. Raises LookupError for a plugin the server does not have, RuntimeError with the
        reason when it FAILED, TimeoutError after `timeout_s`. `on_wait()` is called once if it waits."""
        import time

        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            plugins = {p.name: p for p in self.list_plugins()}
            info = plugins.get(plugin)
            if info is None:
                raise LookupError(f"unknown plugin {plugin!r} (server has: {', '.join(plugins) or 'none'})")
            if info.state == pb.PLUGIN_STATE_READY:
                return info
            if info.state == pb.PLUGIN_STATE_FAILED:
                raise RuntimeError(f"plugin {plugin!r} failed to load: {info.state_reason}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"plugin {plugin!r} still loading after {timeout_s:g} s")
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.05)))

    def list_plugins(self) -> list[pb.PluginInfo]:
        return list(self._call(self.stub.ListPlugins, pb.ListPluginsRequest()).plugins)

    def classify(self, image: ImageInput, plugin: str = "lymphoblast", model_version: str = "",
                 request_id: str = "", timeout_s: float | None = None, specimen_id: str = "", explain: bool = False,
                 microns_per_pixel: float = 0.0) -> Result:
        """Classify one image; raises DxServeError when the call fails. `explain`: also get
        a heatmap of what drove the score (Result.explanation). `microns_per_pixel`: the
        image's pixel size, when known (field plugins use it; Result.objects)."""
        request = pb.ClassifyRequest(request_id=request_id, plugin=plugin, model_version=model_version, image=to_image(image),
                                     specimen_id=specimen_id, explain=explain, microns_per_pixel=microns_per_pixel)
        return Result.from_response(self._call(self.stub.Classify, request, timeout_s))

    def classify_stream(self, images: Iterable[ImageInput | tuple], plugin: str = "lymphoblast", model_version: str = "",
                        timeout_s: float | None = None, specimen_id: str = "", explain: bool = False,
                        final_summaries: list[Specimen] | None = None, resume_within_s: float = 0.0,
                        microns_per_pixel: float = 0.0) -> Iterator[Result]:
        """Stream images and yield one Result per image, in order; failed items come back
        as Results with `ok` False. Items may be (request_id, image) or (request_id, image,
        specimen_id) tuples; `specimen_id` is the default for items that name none. Each
        Result of an item with a specimen carries its running summary (Result.specimen); the
        final summary per specimen, sent once every image is answered, is appended to
        `final_summaries`. `microns_per_pixel`: the images' pixel size, when known (field
        plugins). The timeout covers each stream (None: no deadline).

        When the server stops mid-stream it answers what it read and says where to resume;
        with `resume_within_s` the client then waits up to that long for a server (a restarted
        one, or another replica behind the address) and resends the unanswered images on a new
        stream, so the caller sees one unbroken sequence. Running specimen summaries then start
        again on the new stream."""

        def requests(items: Iterable) -> Iterator[pb.ClassifyRequest]:
            for item in items:
                request_id, image, specimen = (item + (specimen_id,))[:3] if isinstance(item, tuple) else ("", item, specimen_id)
                yield pb.ClassifyRequest(request_id=request_id, plugin=plugin, model_version=model_version, image=to_image(image),
                                         specimen_id=specimen, explain=explain, microns_per_pixel=microns_per_pixel)

        feed = _Resendable(requests(images))
        resume_by = None  # after a stream ended with a resume point: until when to try for a new one
        while True:
            try:
                for response in self.stub.ClassifyStream(feed.attempt(), timeout=timeout_s, metadata=self.metadata):
                    outcome = response.WhichOneof("outcome")
                    if outcome == "final_summary":
                        if final_summaries is not None:
                            final_summaries.append(Specimen.from_proto(response.final_summary))
                        continue
                    feed.answered()
                    specimen = Specimen.from_proto(response.specimen) if response.HasField("specimen") else None
                    if outcome == "result":
                        yield dataclasses.replace(Result.from_response(response.result), specimen=specimen)
                    else:
                        yield dataclasses.replace(Result.from_status(response.request_id, response.error), specimen=specimen)
                return
            except grpc.RpcError as error:
                failure = _error(error)
                if failure.resume_index is not None and resume_within_s:
                    resume_by = time.monotonic() + resume_within_s
                elif not (resume_by and time.monotonic() < resume_by and failure.code in RETRIED_WHILE_RESUMING):
                    raise failure from None  # resuming, a new stream refused for now (the server full) is tried again
            # Not at once: a stream ended to free its place, or refused one, is asked to wait (RetryInfo).
            time.sleep(min(failure.retry_after_s or 0.2, max(resume_by - time.monotonic(), 0.0)))
            self.wait_until_serving(plugin, max(resume_by - time.monotonic(), 0.1))

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            raise _error(error) from None


class _Resendable:
    """The requests of a stream that may have to be sent again on a new stream: those sent
    and not yet answered are kept, and each `attempt()` sends them again first, then goes on
    with the source. gRPC pulls an attempt's requests in its own thread, and an ended
    attempt's thread may still be waiting on the source (a watched folder), so the source is
    pulled by one thread at a time and an item pulled for an ended attempt is kept for the next."""

    def __init__(self, source: Iterator[pb.ClassifyRequest]):
        self.source = source
        self.pending: collections.deque[pb.ClassifyRequest] = collections.deque()
        self.done = 0  # requests answered: pending[0] is request number `done`
        self.current = 0  # the attempt now sending
        self.state, self.pulling = threading.Lock(), threading.Lock()

    def answered(self) -> None:
        with self.state:
            self.pending.popleft()
            self.done += 1

    def attempt(self) -> Iterator[pb.ClassifyRequest]:
        with self.state:
            self.current += 1
            me, position = self.current, self.done
        while True:
            stale, request = self._at(me, position)
            if request is None and not stale:
                with self.pulling:  # one puller; what another one kept may have arrived meanwhile
                    stale, request = self._at(me, position)
                    if request is None and not stale:
                        request = next(self.source, None)
                        if request is None:
                            return
                        with self.state:
                            self.pending.append(request)  # at `position`: only the puller appends
                            stale = self.current != me  # then it is kept for the next attempt
            if stale:
                return
            position += 1
            yield request

    def _at(self, me: int, position: int) -> tuple[bool, pb.ClassifyRequest | None]:
        """(whether attempt `me` has ended, the kept request at `position` or None)."""
        with self.state:
            offset = position - self.done
            return self.current != me, self.pending[offset] if offset < len(self.pending) else None


def _error(error: grpc.RpcError) -> DxServeError:
    status = rpc_status.from_call(error)
    details = unpack_details(status) if status is not None else []
    return DxServeError(error.code(), error.details() or "", details)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array: handy for tests and examples."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
