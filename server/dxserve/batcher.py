"""Dynamic batching: concurrent requests for one model version become one model call.

Items wait in a bounded queue. A worker takes the first item, then gathers more until the
batch is full or `max_wait_s` has passed since that first item, drops items whose caller
has gone (cancelled, or past the deadline), and runs `predict` in the model's own thread,
so the event loop keeps serving while the model works.

A watchdog bounds each model call: one still running after `predict_timeout_s` marks the
version unresponsive (`unresponsive` says why; health reports it), fails its batch and its
queue with UNAVAILABLE at once, and refuses new items fast, until the call returns. The
version's other plugin calls (preprocessing, finding objects, explaining; `guard.py`) mark it
the same way through `hung`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from . import errors, metrics
from .runtime import Decision, ModelRuntime, QualityIssue
from .threads import named_pool

log = logging.getLogger("dxserve.batcher")


class ModelTurns:
    """Whose turn it is on one model: requests' batches (`foreground`) go before background work
    (`background`, e.g. an explanation's passes), one computation at a time. Background calls
    wait while a batch runs or waits, and while `pending()` requests are on their way to the
    model (being decoded); a batch that arrives while a background call runs waits for that
    call only. The cores are then not split between a request and an explanation, and
    explanations use the gaps between requests."""

    POLL_S = 0.005  # how often a waiting background call looks at `pending()` again

    def __init__(self, pending=lambda: 0):
        self._changed = threading.Condition()
        self._busy = False
        self._foreground_waiting = 0
        self._pending = pending

    @contextlib.contextmanager
    def foreground(self):
        with self._changed:
            self._foreground_waiting += 1
            self._changed.wait_for(lambda: not self._busy)
            self._foreground_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def background(self):
        with self._changed:
            while self._busy or self._foreground_waiting or self._pending():
                self._changed.wait(self.POLL_S)  # `pending` changes on the event loop, unannounced
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._changed:
            self._busy = False
            self._changed.notify_all()


@dataclass
class Result:
    """One image's outcome, with where its time went."""

    probabilities: np.ndarray
    decision: Decision
    queued_ms: float
    model_ms: float
    batch_size: int
    issues: tuple[QualityIssue, ...] = ()  # problems the model itself found (runtime.predict_with_issues)


@dataclass
class _Item:
    model_input: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # time.monotonic() after which nobody waits for the result


def shape_groups(inputs: list[np.ndarray]) -> list[list[int]]:
    """Indices of `inputs` grouped by shape and dtype, in order of first appearance: what can
    be stacked into one batch. A plugin whose `preprocess` keeps each image's own size (the
    default does) gets one call per size, instead of a batch that cannot be stacked."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault((np.shape(x), np.asarray(x).dtype.str), []).append(i)
    return list(groups.values())


class Batcher:
    """One per loaded model version; `submit` from any task on the event loop."""

    def __init__(self, plugin: str, runtime: ModelRuntime, max_batch_size: int, max_wait_s: float, max_queue_size: int,
                 predict_timeout_s: float | None = None, on_change: Callable[[], Awaitable[None]] | None = None):
        self.plugin = plugin
        self.runtime = runtime
        self.version = runtime.version.version
        self.max_batch_size = max(1, min(max_batch_size, runtime.max_batch_size))
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_queue_size)
        # One thread per model: TensorFlow and friends parallelise inside a call already.
        self._executor = named_pool(1, f"model-{plugin}")
        self._worker: asyncio.Task | None = None
        self.dropped = 0  # items whose caller left before their batch ran
        self.in_flight = 0  # requests admitted here and not yet answered (see `admit`)
        # Places in the queue, taken before decoding: a full model refuses a unary call before
        # any work is spent on it, and makes a stream item wait (so the stream stops reading).
        self._places = asyncio.Semaphore(max_queue_size)
        self.predict_timeout_s = predict_timeout_s
        self.unresponsive = ""  # why, while a model call (or another plugin call: `hung`) has run past predict_timeout_s
        self._hung = 0  # plugin calls of this version past their time and not returned yet
        self._on_change = on_change  # awaited when `unresponsive` changes (health)
        runtime.turns = ModelTurns(lambda: self.in_flight)  # requests before the runtime's background work (explanations)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.plugin}")
        metrics.watch(self)

    async def stop(self) -> None:
        metrics.unwatch(self)
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        # A model call that never returns is abandoned, not waited for: the server must stop.
        self._executor.shutdown(wait=not self.unresponsive, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def admit(self, wait: bool):
        """Held by a request from routing to its answer: a place in this model's queue, taken
        before the image is decoded. `wait` False (unary calls): RESOURCE_EXHAUSTED at once when
        the queue is full. `wait` True (stream items): wait for a place; the stream meanwhile
        stops reading, and HTTP/2 flow control slows the sender. A retired batcher outlives
        the requests it admitted."""
        if not wait and self._places.locked():
            raise errors.queue_full(self.plugin, self.max_queue_size)
        self.in_flight += 1
        try:
            async with self._places:
                yield self
        finally:
            self.in_flight -= 1

    async def retire(self, timeout_s: float) -> None:
        """Stop once the calls routed here are answered (or after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, model_input: np.ndarray, timeout_s: float | None = None) -> Result:
        """Queue one preprocessed image and wait for its result."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = _Item(model_input, loop.create_future(), now, None if timeout_s is None else now + timeout_s)
        if self.unresponsive:
            raise self.unresponsive_error()
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise errors.queue_full(self.plugin, self.max_queue_size) from None
        return await item.future  # cancelling the caller cancels the future: the worker skips it

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._next_batch(loop)
            except Exception:  # a fault of the batcher itself must not end batching for good
                log.exception("batcher error; it goes on with the next batch", extra={"plugin": self.plugin, "version": self.version})

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Gather one batch from the queue and run it."""
        batch = [await self._queue.get()]
        closes = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = closes - time.monotonic()
            if remaining <= 0:
                break
            getting = asyncio.ensure_future(self._queue.get())
            try:
                done, _ = await asyncio.wait((getting,), timeout=remaining)
            finally:
                if not getting.done():
                    getting.cancel()  # an item it had not taken stays in the queue
            if not done:
                break
            batch.append(getting.result())
        live = self._still_wanted(batch)
        for group in shape_groups([item.model_input for item in live]):  # one model call per input shape
            await self._run_batch(loop, [live[i] for i in group])

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, live: list[_Item]) -> None:
        started = time.monotonic()
        call = loop.run_in_executor(self._executor, self._predict, [item.model_input for item in live])
        # asyncio.wait, not wait_for: wait_for (3.11) may swallow a cancellation that arrives as the
        # call ends, and a stopping batcher would then wait on its queue forever.
        done, _ = await asyncio.wait((call,), timeout=self.predict_timeout_s)
        if not done:
            await self._stalled(call, live)
            return
        try:
            probabilities, decisions, issues = call.result()
        except Exception as error:
            if len(live) > 1:
                # One bad image must not fail its batch-mates: retry each alone to isolate it.
                for item in live:
                    await self._run_batch(loop, [item])
            elif not live[0].future.done():  # a plugin that raises fails the item, never the server
                live[0].future.set_exception(errors.plugin_crashed(self.plugin, error))
            return
        model_ms = (time.monotonic() - started) * 1000
        metrics.BATCH_SIZE.labels(self.plugin, self.version).observe(len(live))
        for item, p, decision, found in zip(live, probabilities, decisions, issues, strict=True):
            if not item.future.done():
                item.future.set_result(Result(p, decision, (started - item.enqueued) * 1000, model_ms, len(live), tuple(found)))

    def unresponsive_error(self, what: str = "") -> errors.ServingError:
        """UNAVAILABLE (VERSION_UNRESPONSIVE): why this version refuses, or why it will (`what` has hung)."""
        return errors.unavailable(self.plugin, self.reason(what) if what else self.unresponsive, "VERSION_UNRESPONSIVE",
                                  retry_after_s=1)

    async def _stalled(self, call: asyncio.Future, batch: list[_Item]) -> None:
        """The watchdog: a model call ran past `predict_timeout_s`. Fail its batch and the queue
        now, refuse new items, and wait (the model's one thread is taken) for it to return."""
        for item in batch:
            if not item.future.done():
                item.future.set_exception(self.unresponsive_error("model call"))
        await self.hung("model call", call)

    def reason(self, what: str) -> str:
        return (f"model version {self.version!r} of plugin {self.plugin!r} is unresponsive: a {what} has run over "
                f"{self.predict_timeout_s:g} s (predict_timeout_s); requests are refused until it returns")

    async def hung(self, what: str, call: asyncio.Future) -> None:
        """A plugin call of this version (`what`: "model call", "preprocessing", ...) has run past
        `predict_timeout_s`: the version is unresponsive (health, fast refusals, its queue failed)
        until every such call has returned. Returns when `call` has."""
        self._hung += 1
        if not self.unresponsive:
            self.unresponsive = self.reason(what)
            log.error(f"{what} hung; version marked unresponsive", extra={"plugin": self.plugin, "version": self.version,
                                                                          "predict_timeout_s": self.predict_timeout_s})
            metrics.UNRESPONSIVE.labels(self.plugin, self.version).inc()
            error = self.unresponsive_error()
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(error)
            if self._on_change:
                await self._on_change()
        stalled_at = time.monotonic()
        await asyncio.gather(call, return_exceptions=True)
        self._hung -= 1
        if self._hung == 0:
            self.unresponsive = ""
            log.warning(f"hung {what} returned; version serves again", extra={
                "plugin": self.plugin, "version": self.version,
                "seconds": round(time.monotonic() - stalled_at + self.predict_timeout_s, 1)})
            if self._on_change:
                await self._on_change()

    def _still_wanted(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # cancelled: the client went away
                self.dropped += 1
                metrics.DROPPED.labels(self.plugin, self.version, "cancelled").inc()
            elif item.deadline is not None and now >= item.deadline:
                self.dropped += 1
                metrics.DROPPED.labels(self.plugin, self.version, "deadline").inc()
                item.future.set_exception(errors.deadline_exceeded(self.plugin))
            else:
                live.append(item)
        return live

    def _predict(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[Decision], list]:
        """In the model's thread: the batch stacked (a copy of every input, off the event loop), run, decided."""
        batch = np.stack(inputs)
        with self.runtime.turns.foreground():
            output = self.runtime.predict_with_issues(batch)
        issues = list(output.issues)
        probabilities = np.asarray(output.probabilities, dtype=np.float64)
        expected = (len(batch), len(self.runtime.info.labels))
        if probabilities.shape != expected or len(issues) != len(batch):
            raise ValueError(f"predict_with_issues returned probabilities of shape {probabilities.shape} and "
                             f"{len(issues)} issue lists, expected {expected}")
        return probabilities, [self.runtime.decide(p) for p in probabilities], issues
