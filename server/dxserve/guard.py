"""Plugin calls outside the model under the model's watchdog (issue 32).

Decoding and preprocessing (`ModelRuntime.prepare`), finding a field's objects (`find_objects`)
and explaining (`explain`) run in small thread pools shared by every plugin and caller. A call
that never returns would hold one of those threads for good: two hung preprocess calls on two
cores stopped every plugin. `GuardedPool.run` therefore bounds each call by `timeout_s`
(`predict_timeout_s`), counted from when the call starts, not while it waits for a thread:

- past it, the request gets UNAVAILABLE (`VERSION_UNRESPONSIVE`), and the version is
  unresponsive (health NOT_SERVING, its requests refused fast) until the call returns
  (`Batcher.hung`), so no more of its calls go in to hang;
- the pool is replaced by a fresh one of the same size (the old one finishes what it holds and
  ends), so every other plugin and caller keeps its threads. At most `max_abandoned` calls are
  abandoned at once; past that the pool is not replaced again (and says so) until some return.

A Python thread cannot be stopped: an abandoned call runs on until it returns. At exit, the
server does not wait for them (`cli._exit_past_hung_threads`).

The pool's threads are shared fairly between callers (`FairTurns`): a call waits for a turn,
and a freed thread goes to the next caller in turn, not to the oldest call, so one caller's
hundreds of queued images cannot make another's one image wait behind them all (issue 32).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .threads import named_pool

log = logging.getLogger("dxserve.guard")


class FairTurns:
    """`slots` turns shared round-robin between callers: each caller's waiting calls in order,
    callers in turn. Event-loop only."""

    def __init__(self, slots: int):
        self.free = slots
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def turn(self, caller: str):
        if self.free > 0 and not self._waiting:
            self.free -= 1
        else:
            granted = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(caller, deque()).append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # given a turn as it was cancelled: pass it on
                    self._release()
                else:
                    self._forget(caller, granted)
                raise
        try:
            yield
        finally:
            self._release()

    def _forget(self, caller: str, granted: asyncio.Future) -> None:
        queue = self._waiting.get(caller)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self._waiting[caller]

    def _release(self) -> None:
        """A turn ends: the next caller in turn gets it (then goes to the back), else it is free."""
        while self._waiting:
            caller, queue = next(iter(self._waiting.items()))
            granted = queue.popleft()
            if queue:
                self._waiting.move_to_end(caller)
            else:
                del self._waiting[caller]
            if not granted.done():
                granted.set_result(None)
                return
        self.free += 1


class GuardedPool:
    """A thread pool whose calls are bounded by a watchdog, whose hung threads are replaced, and
    whose threads are shared fairly between callers."""

    def __init__(self, workers: int, role: str, timeout_s: float | None, max_abandoned: int | None = None):
        self.workers, self.role, self.timeout_s = workers, role, timeout_s
        self.max_abandoned = 4 * workers if max_abandoned is None else max_abandoned
        self.abandoned = 0  # calls past their time that have not returned
        self._pool: ThreadPoolExecutor = named_pool(workers, role)
        # Twice the threads in turns at once: a thread that finishes finds the next call already
        # queued, instead of idling while the event loop hands the turn on (that cost the server
        # about 3 ms of CPU a cell); a caller still waits behind at most two turns of others'.
        self._turns = FairTurns(2 * workers)

    async def run(self, batcher, what: str, function: Callable, *args, caller: str = ""):
        """`function(*args)` in the pool, for `batcher`'s version, in `caller`'s turn; its result,
        or its exception, or (past `timeout_s` once started) the version's VERSION_UNRESPONSIVE
        error (the turn is then given back: the pool has a fresh thread for it)."""
        async with self._turns.turn(caller):
            return await self._run(batcher, what, function, *args)

    async def _run(self, batcher, what: str, function: Callable, *args):
        loop = asyncio.get_running_loop()
        started: list[float] = []  # when a thread took the call (written by that thread: no wake-up of the loop)

        def call():
            started.append(time.monotonic())
            return function(*args)

        running = loop.run_in_executor(self._pool, call)
        if self.timeout_s is None:
            return await running
        deadline = time.monotonic() + self.timeout_s
        while True:
            done, _ = await asyncio.wait((running,), timeout=max(deadline - time.monotonic(), 0.0))
            if done:
                return running.result()
            if not started:  # still waiting for a thread: that is not hanging
                deadline = time.monotonic() + self.timeout_s
            elif started[0] + self.timeout_s > time.monotonic():
                deadline = started[0] + self.timeout_s
            else:
                break
        self._abandon(running, batcher.plugin, what)
        asyncio.ensure_future(batcher.hung(what, running))
        raise batcher.unresponsive_error(what)

    def _abandon(self, running: asyncio.Future, plugin: str, what: str) -> None:
        self.abandoned += 1
        running.add_done_callback(lambda _: self._returned())
        if self.abandoned > self.max_abandoned:
            log.error(f"{what} hung; {self.abandoned} calls abandoned, over {self.max_abandoned}: the {self.role} pool is "
                      "not replaced again until some return", extra={"plugin": plugin})
            return
        old, self._pool = self._pool, named_pool(self.workers, self.role)
        old.shutdown(wait=False)  # its other threads finish what they hold, then end
        log.error(f"{what} hung; its thread is abandoned and the {self.role} pool replaced", extra={
            "plugin": plugin, "abandoned": self.abandoned, "timeout_s": self.timeout_s})

    def _returned(self) -> None:
        self.abandoned -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

