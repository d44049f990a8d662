"""Explanations run apart from classification, so that a burst of them never starves it.

An explanation costs about as much as a hundred classifications (an occlusion map is ~150
forward passes). They get their own thread pool (`explain_threads`, default 1) instead of
the decode pool every request needs, and a bounded number of places: at most
`max_queued_explanations` admitted at once (running or waiting for the pool) and at most
`max_explanations_per_caller` of them one caller's. A unary call past either limit is answered
RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo at once, before its image is decoded; a
stream item waits for a place (the stream slows down, as it does for a full model queue).
Requests without an explanation never wait for these. Bounded places also bound the memory a
burst can take.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from . import errors, metrics
from .guard import GuardedPool


class ExplanationLimits:
    def __init__(self, threads: int, max_queued: int, per_caller: int, timeout_s: float | None = None):
        self.pool = GuardedPool(threads, "explain", timeout_s)  # an explanation that hangs is abandoned, as in guard.py
        self.max_queued, self.per_caller = max_queued, per_caller
        self.admitted = 0
        self.by_caller: Counter[str] = Counter()
        self._freed = asyncio.Condition()

    def _full(self, caller: str) -> str:
        """Which limit leaves no place for `caller` ("server", "caller"), or "" when one is free."""
        return "server" if self.admitted >= self.max_queued else "caller" if self.by_caller[caller] >= self.per_caller else ""

    @contextlib.asynccontextmanager
    async def admit(self, caller: str, plugin: str, wait: bool):
        """A place for one explanation, held until it is made. None free: RESOURCE_EXHAUSTED at
        once, or with `wait` (stream items) wait for one."""
        if full := self._full(caller):
            if not wait:
                metrics.EXPLANATIONS_REFUSED.labels(full).inc()
                subject, limit = ("server", self.max_queued) if full == "server" else (f"caller:{caller}", self.per_caller)
                raise errors.explanations_full(subject, limit, plugin)
            async with self._freed:
                await self._freed.wait_for(lambda: not self._full(caller))
        self.admitted += 1
        self.by_caller[caller] += 1
        try:
            yield
        finally:
            self.admitted -= 1
            self.by_caller[caller] -= 1
            if not self.by_caller[caller]:
                del self.by_caller[caller]
            async with self._freed:
                self._freed.notify_all()

    async def run(self, batcher, function, *args, caller: str = ""):
        """`function(*args)` in the explanation pool, for `batcher`'s version, under the watchdog."""
        return await self.pool.run(batcher, "explanation", function, *args, caller=caller)

    def close(self) -> None:
        self.pool.shutdown()
