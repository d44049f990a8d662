"""The dxserve.v1.DiagnosticsService implementation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from . import audit, auth, errors, images, metrics, registry
from .batcher import Batcher, Result
from .config import Settings
from .explanations import ExplanationLimits
from .registry import FAILED, LOADING, PluginEntry, ensure_loaded
from .runtime import INDETERMINATE, Decision, QualityIssue
from .shadow import Shadow
from .specimens import StreamSpecimens, Tally, check_specimen_id
from .inflight import InflightBytes
from .streams import requests_while_open
from .guard import GuardedPool
from .v1 import diagnostics_pb2 as pb
from .v1 import diagnostics_pb2_grpc as pb_grpc

log = logging.getLogger("dxserve.service")

STATES = {LOADING: pb.PLUGIN_STATE_LOADING, registry.READY: pb.PLUGIN_STATE_READY, FAILED: pb.PLUGIN_STATE_FAILED}
MAX_REQUEST_ID = 256  # characters of a client's request_id
STREAMING = {"ClassifyStream", "ModelStreamInfer"}  # methods whose items wait for a place in the queue (backpressure)
SHADOW_TIMEOUT_S = 60.0  # a shadow classification (shadow.py) gives up after this long
FIELD_CLASSIFIED = "classified"  # a field plugin's decision when some object it found was classified
VERSION_STATES = {registry.AVAILABLE: pb.VERSION_STATE_AVAILABLE, registry.READY: pb.VERSION_STATE_READY,
                  FAILED: pb.VERSION_STATE_FAILED, registry.NOT_SERVED: pb.VERSION_STATE_NOT_SERVED,
                  registry.UNRESPONSIVE: pb.VERSION_STATE_UNRESPONSIVE}


class DiagnosticsService(pb_grpc.DiagnosticsServiceServicer):
    def __init__(self, plugins: dict[str, PluginEntry], settings: Settings, audit_trail: audit.AuditTrail | None = None):
        self.plugins = plugins
        self.settings = settings
        self.audit = audit_trail
        self.draining = asyncio.Event()  # set on SIGTERM (`drain`): streams stop reading (see ClassifyStream)
        self._drain_deadline = float("inf")  # loop time after which a draining stream answers nothing more
        self.crowded: Callable[[], bool] = lambda: False  # whether calls are near their cap (set by the app: auth.py)
        # Decoding and preprocessing run here, in parallel across requests, off the event loop,
        # each call under the watchdog (guard.py): a hung one costs its version, not the pool.
        self._decode = GuardedPool(settings.decode_threads, "decode", settings.predict_timeout_s)
        self.inflight = InflightBytes(settings.max_inflight_mb * 2**20)  # requests held, every door together
        self._explanations = ExplanationLimits(settings.explain_threads, settings.max_queued_explanations,
                                               settings.max_explanations_per_caller, settings.predict_timeout_s)
        # Candidate versions answering in shadow beside the served ones (shadow.py); never returned.
        self.shadow = Shadow(settings.shadow, lambda r, request_id: self._classify(r, request_id, SHADOW_TIMEOUT_S, "Shadow"),
                             self.audit.record if self.audit else None) if settings.shadow else None

    def drain(self) -> None:
        """SIGTERM: streams stop reading at once, answer in order what finishes within
        `drain_answer_s`, drop the rest unrun, and end with the index to resume from."""
        self._drain_deadline = asyncio.get_running_loop().time() + min(self.settings.drain_answer_s,
                                                                       self.settings.grace_period_s / 2)
        self.draining.set()

    def close(self) -> None:
        self._decode.shutdown()
        self._explanations.close()

    async def ListPlugins(self, request: pb.ListPluginsRequest, context) -> pb.ListPluginsResponse:
        caller = auth.CALLER.get()
        return pb.ListPluginsResponse(plugins=[self._describe(e) for e in self.plugins.values() if caller.may_use(e.name)])

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        request_id = request.request_id or str(uuid.uuid4())
        with self.inflight.holding(request.ByteSize()) as full:  # past max_inflight_mb: refused, and recorded so
            outcome = await self.answer(request, request_id, context.time_remaining(), "Classify", refused=full)
        if isinstance(outcome, errors.ServingError):
            return outcome.end(context)
        return outcome

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        # Items run concurrently (so they share batches) but are answered in request order.
        # The bounded window stops reading from a client that sends faster than we classify.
        # Each entry: the item's task, its specimen tally, and an event set once its result is being recorded.
        window: asyncio.Queue[tuple[asyncio.Future, Tally | None, asyncio.Event] | None] = asyncio.Queue(self.settings.stream_window)
        specimens = StreamSpecimens(self.plugins)  # this stream's running summaries
        answered = 0

        ended = []  # why the server stopped reading, when it was idle or too old (errors.stream_ended)

        async def read() -> None:
            try:
                index = 0
                async for request in requests_while_open(request_iterator, self.settings, ended, self.crowded):
                    size, item = request.ByteSize(), None
                    await self.inflight.take(size)  # past max_inflight_mb, read no further until some is answered
                    recorded = asyncio.Event()
                    try:
                        tally = specimens.tally_for(request)
                        item = asyncio.ensure_future(self._stream_item(request, index, context.time_remaining(), recorded))
                    except errors.ServingError as refusal:
                        tally, item = None, asyncio.get_running_loop().create_future()
                        item.set_result(pb.ClassifyStreamResponse(request_id=errors.clip(request.request_id), index=index,
                                                                  error=refusal.to_status()))
                    finally:
                        self.inflight.until_done(item, size)
                    try:
                        await window.put((item, tally, recorded))
                    except asyncio.CancelledError:  # read, but never to be answered: the client resends it
                        item.cancel()
                        raise
                    index += 1
            finally:  # also when reading fails, so the writer below never waits forever
                await window.put(None)

        reader = asyncio.ensure_future(read())
        # On SIGTERM: stop reading at once, answer what finishes in time, then say where to resume.
        stop_reading = asyncio.ensure_future(self._stop_reading_on_drain(reader))
        try:
            while (entry := await window.get()) is not None:
                task, tally, recorded = entry
                if not await self._finished_unless_drained(task, recorded, stop_reading):
                    task.cancel()  # the server stops: this item and those after it are dropped and resent by the client
                    break
                response = task.result()
                if tally is not None:  # counted in order, so each summary includes exactly the items before it
                    tally.add(response)
                    response.specimen.CopyFrom(tally.summary())
                answered += 1
                yield response
            if self.draining.is_set() and (reader.cancelled() or entry is not None):
                errors.draining(answered).end(context)
                return
            if ended:
                errors.stream_ended(ended[0][0], answered, *ended[0][1:]).end(context)
                return
            try:
                await reader
            except errors.ServingError as refusal:  # e.g. the caller's token was revoked mid-stream (auth)
                refusal.end(context)
                return
            for summary in specimens.finals():  # the client half-closed: each specimen's final summary
                yield pb.ClassifyStreamResponse(index=answered, final_summary=summary)
        finally:  # the client left or the call ended: drop what it will never read
            reader.cancel()
            stop_reading.cancel()
            while not window.empty():
                if (entry := window.get_nowait()) is not None:
                    entry[0].cancel()

    def _check_limits(self, request: pb.ClassifyRequest) -> None:
        """The message limit, checked per request (the transport allows more, so an oversized
        stream item costs that item only, not the stream), and the request id's length."""
        size = request.ByteSize()
        if size > self.settings.max_message_bytes:
            raise errors.message_too_large(size, self.settings.max_message_bytes)
        if len(request.request_id) > MAX_REQUEST_ID:
            raise errors.invalid_field("request_id", "REQUEST_ID_TOO_LONG", f"request_id has {len(request.request_id)} "
                                       f"characters; the limit is {MAX_REQUEST_ID}")

    async def _stop_reading_on_drain(self, reader: asyncio.Future) -> None:
        await self.draining.wait()
        reader.cancel()

    async def _finished_unless_drained(self, item: asyncio.Future, recorded: asyncio.Event, drained: asyncio.Future) -> bool:
        """Wait for a stream item; False when the server drains and the item is not done by the
        drain deadline (so a full read-ahead window never holds the stop past its grace). An
        item whose result is already being recorded is waited for: a result in the audit trail
        is a result given."""
        if not self.draining.is_set():
            await asyncio.wait((item, drained), return_when=asyncio.FIRST_COMPLETED)
        if not item.done():
            remaining = self._drain_deadline - asyncio.get_running_loop().time()
            await asyncio.wait((item,), timeout=max(remaining, 0))
        if not item.done() and recorded.is_set():
            await asyncio.wait((item,))
        return item.done()

    async def _stream_item(self, request: pb.ClassifyRequest, index: int, timeout: float | None,
                           recorded: asyncio.Event) -> pb.ClassifyStreamResponse:
        request_id = request.request_id or str(uuid.uuid4())
        outcome = await self.answer(request, request_id, timeout, "ClassifyStream", recorded)
        if isinstance(outcome, errors.ServingError):
            return pb.ClassifyStreamResponse(request_id=errors.clip(request_id), index=index, error=outcome.to_status())
        return pb.ClassifyStreamResponse(request_id=request_id, index=index, result=outcome)

    async def answer(self, request: pb.ClassifyRequest, request_id: str, timeout: float | None, method: str,
                     recorded: asyncio.Event | None = None,
                     refused: errors.ServingError | None = None) -> pb.ClassifyResponse | errors.ServingError:
        """The response, or the error to send for this request: counted, logged, and recorded
        in the audit trail before it is sent (`recorded` is set when that record starts).
        `method` names the gRPC method in the audit trail (the Open Inference Protocol's too,
        see inference.py); `refused`: an error found before the request could be made (e.g. a
        malformed tensor), answered and recorded the same way."""
        started = time.monotonic()
        try:
            if refused is not None:
                raise refused
            outcome = await self._classify(request, request_id, timeout, method)
        except errors.ServingError as error:
            outcome = error.detached()
        except asyncio.CancelledError:  # gRPC ended the call: its deadline passed, or the client left
            timed_out = timeout is not None and time.monotonic() - started >= timeout
            outcome = errors.deadline_exceeded(request.plugin) if timed_out else errors.cancelled()
            self._count(request, outcome, time.monotonic() - started)
            if self.audit is not None:  # recorded all the same, but nobody waits for it
                asyncio.ensure_future(self._record(method, request, request_id, outcome, started))
            raise
        except Exception as error:  # a server bug costs this item, never the stream or the server
            log.exception("unexpected error", extra={"request_id": errors.clip(request_id), "plugin": errors.clip(request.plugin)})
            outcome = errors.unexpected(error)
        if recorded is not None:
            recorded.set()
        if self.audit is not None:
            try:
                written = await self._record(method, request, request_id, outcome, started)
                if written is not None and not isinstance(outcome, errors.ServingError):
                    outcome.audit_seq, outcome.input_sha256 = written  # the result names its record
            except audit.AuditUnavailable as error:  # no result without a record
                outcome = errors.unavailable("audit", f"the audit trail cannot be written, so no result is given: {error}",
                                             "AUDIT_UNAVAILABLE", retry_after_s=1)
        self._count(request, outcome, time.monotonic() - started)
        if self.shadow is not None and not isinstance(outcome, errors.ServingError):
            self.shadow.observe(request, outcome, auth.CALLER.get().name)  # after the answer is recorded
        if isinstance(outcome, errors.ServingError):
            log.info("request failed", extra={"request_id": errors.clip(request_id), "plugin": errors.clip(request.plugin),
                                              "code": outcome.code.name, "error": outcome.message})
        return outcome

    def _record(self, method: str, request: pb.ClassifyRequest, request_id: str, outcome, started: float):
        """The audit trail's write of this outcome (a coroutine)."""
        return self.audit.record(**audit.outcome_record(method, auth.CALLER.get().name, request, request_id, outcome,
                                                        time.monotonic() - started))

    def _count(self, request: pb.ClassifyRequest, outcome, seconds: float) -> None:
        """Metrics of one answer. Only names the server has become label values: one series per
        client-chosen name would let any caller grow /metrics without bound."""
        entry = self.plugins.get(request.plugin)
        if isinstance(outcome, errors.ServingError):
            version = request.model_version or (entry.default_version if entry else "")
            known = entry is not None and any(v.version == version for v in entry.versions)
            metrics.answered(entry.name if entry else metrics.UNKNOWN, version if known else metrics.UNKNOWN,
                             outcome.code.name, seconds)
        else:
            metrics.answered(outcome.plugin, outcome.model_version, "OK", seconds, outcome.decision.label, not outcome.quality.passed)

    async def _classify(self, request: pb.ClassifyRequest, request_id: str, timeout: float | None,
                        method: str) -> pb.ClassifyResponse:
        started = time.monotonic()
        wait = method in STREAMING
        self._check_limits(request)
        check_specimen_id(request.specimen_id)
        entry, batcher = await self._route(request)
        if entry.info.objects_plugin:  # a field plugin: find its objects, have the objects plugin classify each
            return await self._classify_field(request, request_id, entry, batcher, started, timeout, method)
        # A place in the model's queue before any decoding: refused at once (unary) or waited
        # for (stream items: backpressure). A reload retires this version only once we are done.
        # An explanation also needs one of its own few places, or is refused at once.
        async with (self._explanations.admit(auth.CALLER.get().name, entry.name, wait) if request.explain
                    else contextlib.nullcontext()):
            async with batcher.admit(wait):
                response, rgb = await self._run(request, request_id, entry, batcher, started, timeout)
            if request.explain:  # only now, after its place in the model's queue is given back
                response.explanation.CopyFrom(await self._explanations.run(batcher, self._explain, rgb, batcher,
                                                                           caller=auth.CALLER.get().name))
            return response

    async def _run(self, request: pb.ClassifyRequest, request_id: str, entry: PluginEntry, batcher: Batcher, started: float,
                   timeout: float | None) -> tuple[pb.ClassifyResponse, np.ndarray | None]:
        """The response without its explanation, and the decoded image when one was asked for."""
        runtime = batcher.runtime
        if request.explain and not runtime.explains():
            raise errors.unimplemented(entry.name, "EXPLANATION", f"plugin {entry.name!r} cannot explain its results")
        rgb, model_input, issues = await self._decode.run(batcher, "preprocessing", self._prepare, request, batcher,
                                                          caller=auth.CALLER.get().name)
        remaining = None if timeout is None else timeout - (time.monotonic() - started)
        if remaining is not None and remaining <= 0:
            raise errors.deadline_exceeded(entry.name)
        result = await batcher.submit(model_input, remaining)
        issues = issues + list(result.issues)  # the plugin's gate, then what the model itself found
        if issues:  # they overrule the call: no label on an image the plugin refused
            result = dataclasses.replace(result, decision=Decision(
                INDETERMINATE, True, "input quality gate: " + _in_words(issues),
                rule=result.decision.rule))
        response = self._response(request_id, entry, runtime, result, issues)
        response.specimen_id = request.specimen_id
        return response, rgb

    async def _classify_field(self, request: pb.ClassifyRequest, request_id: str, entry: PluginEntry, batcher: Batcher,
                              started: float, timeout: float | None, method: str) -> pb.ClassifyResponse:
        """A field plugin's image: its objects found (in a worker thread), then each answered as
        a request of its own to the objects plugin (request_id "<field's>/<index>"): its batcher,
        gate, decision, limits, explanation (when asked) and audit row. One object's error is that
        object's only."""
        found, issues = await self._decode.run(batcher, "search for objects", self._find, request, batcher,
                                               caller=auth.CALLER.get().name)
        limit = self.settings.max_objects_per_field
        if len(found) > limit:
            raise errors.invalid_field("image", "TOO_MANY_OBJECTS", f"plugin {entry.name!r} found {len(found)} objects in "
                                       f"this image; the limit is {limit} (max_objects_per_field): send a smaller field")
        remaining = None if timeout is None else timeout - (time.monotonic() - started)
        objects_plugin = entry.info.objects_plugin
        asked = [] if issues else [pb.ClassifyRequest(
            request_id=f"{request_id}/{i}", plugin=objects_plugin, image=images.raw_image(o.image),
            specimen_id=request.specimen_id, explain=request.explain) for i, o in enumerate(found)]
        # The objects' masks are encoded in a thread while the objects are answered (64 masks: 30 ms
        # that had run on the event loop after every answer was in).
        masks = asyncio.get_running_loop().run_in_executor(
            None, lambda: [images.mask_png(o.mask) if o.mask is not None else b"" for o in found])
        outcomes = await asyncio.gather(*(self.answer(a, a.request_id, remaining, method) for a in asked))
        masks = await masks
        runtime = batcher.runtime
        response = pb.ClassifyResponse(request_id=request_id, plugin=entry.name, model_version=runtime.version.version,
                                       weights_sha256=runtime.version.weights_sha256, specimen_id=request.specimen_id)
        field = response.field
        field.found, field.objects_plugin = len(found), objects_plugin
        called: dict[str, int] = {}
        for i, (o, mask, outcome) in enumerate(zip(found, masks, outcomes or [None] * len(found), strict=True)):
            item = response.objects.add(index=i, plugin=objects_plugin, box=pb.Box(x=o.box[0], y=o.box[1], width=o.box[2],
                                                                                    height=o.box[3]), mask_png=mask)
            if isinstance(outcome, errors.ServingError):
                item.error.CopyFrom(outcome.to_status())
                field.failed += 1
            elif outcome is not None:
                item.result.CopyFrom(outcome)
                field.objects_model_version = outcome.model_version
                if outcome.decision.indeterminate:
                    field.indeterminate += 1
                else:
                    field.classified += 1
                    called[outcome.decision.label] = called.get(outcome.decision.label, 0) + 1
        response.quality.CopyFrom(_quality(issues))
        if issues:
            reason = "field quality gate: " + _in_words(issues) + "; no object classified"
        else:
            labels = ", ".join(f"{label} {n}" for label, n in sorted(called.items()))
            reason = (f"{field.found} found: {field.classified} classified" + (f" ({labels})" if labels else "")
                      + f", {field.indeterminate} indeterminate, {field.failed} failed")
        decided = field.classified > 0 and not issues
        response.decision.CopyFrom(pb.Decision(label=FIELD_CLASSIFIED if decided else INDETERMINATE,
                                               indeterminate=not decided, reason=reason))
        return response

    def _find(self, request: pb.ClassifyRequest, batcher: Batcher):
        """Decode a field and find its objects (in a worker thread): (objects, the field's quality issues)."""
        def find(rgb):
            found, issues = batcher.runtime.find_objects(rgb, request.microns_per_pixel)
            return list(found), list(issues)

        return self._on_decoded(request, batcher, find)

    def _prepare(self, request: pb.ClassifyRequest, batcher: Batcher):
        """Decode, validate, check and preprocess one image (in a worker thread):
        (the decoded image if an explanation was asked for, model input, the plugin's quality issues)."""
        def prepare(rgb):
            model_input, issues = batcher.runtime.prepare(rgb)
            return rgb if request.explain else None, model_input, list(issues)

        return self._on_decoded(request, batcher, prepare)

    def _on_decoded(self, request: pb.ClassifyRequest, batcher: Batcher, plugin_call):
        """`plugin_call(rgb)` on the request's decoded image (in a worker thread); what the plugin
        raises becomes plugin_crashed, a bad image the decoder's own error."""
        with images.memory_slot(request.image):  # large images one at a time: memory stays bounded
            spec = batcher.runtime.info.input
            limit = self._max_pixels(spec)
            whose = "max_image_pixels" if limit == self.settings.max_image_pixels else f"plugin {batcher.plugin!r}'s max_pixels"
            rgb = images.decode(request.image, limit, spec.min_side, whose)
            try:
                return plugin_call(rgb)
            except Exception as error:
                raise errors.plugin_crashed(batcher.plugin, error) from None

    def _max_pixels(self, spec) -> int:
        """The largest image a plugin is given: its own `InputSpec.max_pixels` within the server's."""
        return min(self.settings.max_image_pixels, spec.max_pixels or self.settings.max_image_pixels)

    def _explain(self, rgb, batcher: Batcher) -> pb.Explanation:
        """The plugin's heatmap for one image, as PNGs (in a worker thread)."""
        try:
            explanation = batcher.runtime.explain(rgb)
        except NotImplementedError as error:  # e.g. an older model version of a plugin that explains newer ones
            raise errors.unimplemented(batcher.plugin, "EXPLANATION", f"plugin {batcher.plugin!r} cannot explain this "
                                       f"model version: {error}") from None
        except Exception as error:
            raise errors.plugin_crashed(batcher.plugin, error) from None
        heatmap_png, overlay_png = images.heatmap_pngs(rgb, explanation.heatmap)
        return pb.Explanation(method=explanation.method, label=explanation.label, heatmap_png=heatmap_png, overlay_png=overlay_png)

    async def _route(self, request: pb.ClassifyRequest) -> tuple[PluginEntry, Batcher]:
        auth.authorize(request.plugin)
        entry = self.plugins.get(request.plugin)
        if entry is None:
            raise errors.unknown_plugin(request.plugin, self.plugins)
        if entry.state == LOADING:
            raise errors.unavailable(entry.name, f"plugin {entry.name!r} is still loading", "PLUGIN_LOADING", retry_after_s=1)
        if entry.state == FAILED:
            raise errors.unavailable(entry.name, f"plugin {entry.name!r} failed to load: {entry.reason}", "PLUGIN_FAILED")
        pinned = request.weights_sha256.lower()
        # Named, else the one serving the pinned weights, else the caller's (its lab's site version), else the plugin's.
        version = (request.model_version or self._version_with(entry, pinned) or auth.CALLER.get().default_version(entry.name)
                   or entry.default_version)
        served = next((v for v in entry.versions if v.version == version), None)
        if served is None:
            raise errors.unknown_version(entry.name, version, [v.version for v in entry.versions])
        if pinned and served.weights_sha256 != pinned:
            raise errors.weights_mismatch(entry.name, version, served.weights_sha256, pinned)
        return entry, await ensure_loaded(entry, version, self.settings)  # versions other than the default load on first use

    @staticmethod
    def _version_with(entry: PluginEntry, weights_sha256: str) -> str:
        """The version serving these weights: the default if it does, else the newest that does; "" if none."""
        having = [v.version for v in entry.versions if weights_sha256 and v.weights_sha256 == weights_sha256]
        return entry.default_version if entry.default_version in having else next(iter(having), "")

    def _response(self, request_id: str, entry: PluginEntry, runtime, result: Result, issues: list[QualityIssue]) -> pb.ClassifyResponse:
        labels = runtime.info.labels
        top = int(result.probabilities.argmax())
        return pb.ClassifyResponse(
            request_id=request_id,
            plugin=entry.name,
            model_version=runtime.version.version,
            weights_sha256=runtime.version.weights_sha256,
            probabilities=[pb.LabelProbability(label=l, probability=float(p)) for l, p in zip(labels, result.probabilities, strict=True)],
            top_label=labels[top],
            confidence=float(result.probabilities[top]),
            decision=pb.Decision(**dataclasses.asdict(result.decision)),
            timing=pb.Timing(queued_ms=result.queued_ms, model_ms=result.model_ms, batch_size=result.batch_size),
            quality=_quality(issues),
        )

    def _describe(self, entry: PluginEntry) -> pb.PluginInfo:
        info = entry.info
        message = pb.PluginInfo(name=entry.name, state=STATES[entry.state], state_reason=entry.reason,
                                default_model_version=entry.default_version,
                                explains=bool(entry.runtime_class and entry.runtime_class.explains()))
        if info is not None:
            message.version, message.description, message.intended_use = info.version, info.description, info.intended_use
            message.objects_plugin = info.objects_plugin
            message.labels.extend(info.labels)
            message.input.CopyFrom(pb.InputSpec(
                formats=images.FORMATS, max_pixels=self._max_pixels(info.input),
                max_message_bytes=self.settings.max_message_bytes, min_side=info.input.min_side,
                description=info.input.description,
            ))
        for v in entry.versions:
            state, reason = entry.version_state(v.version)
            message.model_versions.add(version=v.version, weights_sha256=v.weights_sha256, model_card=v.model_card,
                                       model_card_json=v.model_card_json, state=VERSION_STATES[state], state_reason=reason,
                                       safety_checks=sorted(entry.runtime_class.safety_checks(v)))
        return message


def _quality(issues: list[QualityIssue]) -> pb.QualityCheck:
    return pb.QualityCheck(passed=not issues, issues=[
        pb.QualityIssue(code=i.code, message=i.message, value=i.value, accepted_min=i.accepted_min,
                        accepted_max=i.accepted_max) for i in issues])


def _in_words(issues: list[QualityIssue]) -> str:
    return "; ".join(f"{i.code}: {i.message}" for i in issues)
