"""The bytes of requests the server holds: read and not yet answered, summed over every call.

A stream reads ahead (`stream_window` items) and unary calls wait for the decode threads, each
holding its request until it is answered: four streams of 10 MB images took the server to 3.7 GB.
`max_inflight_mb` bounds that sum. A stream stops reading while it is reached (gRPC's flow
control then slows its client, as a full window does); a unary call past it is refused
RESOURCE_EXHAUSTED (`INFLIGHT_FULL`, with RetryInfo) and recorded like any refusal. Streams wait
in turn, first come first served, and a unary call is not let in ahead of them; a request larger
than the whole budget still goes when nothing else is held, so no size of request waits for ever.
Used on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from . import errors, metrics


class InflightBytes:
    def __init__(self, limit_bytes: int):
        self.limit, self.used = limit_bytes, 0
        self._waiting: deque[tuple[asyncio.Future, int]] = deque()
        metrics.INFLIGHT_BYTES.set_function(lambda: self.used)

    @contextlib.contextmanager
    def holding(self, size: int):
        """For a unary call: hold `size` bytes while the block runs if they fit; it gets None, or
        the INFLIGHT_FULL refusal to answer with."""
        if not self.try_take(size):
            yield errors.inflight_full(size, self.used, self.limit // 2**20, bool(self._waiting))
            return
        try:
            yield None
        finally:
            self.release(size)

    def try_take(self, size: int) -> bool:
        """Hold `size` bytes now if they fit (and no stream waits before), else False."""
        if self._waiting or not self._fits(size):
            return False
        self.used += size
        return True

    async def take(self, size: int) -> None:
        """Hold `size` bytes, waiting in turn until they fit."""
        if self.try_take(size):
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((granted, size))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(size)  # granted as the waiter was cancelled: give it back
            else:
                self._waiting.remove((granted, size))
                self._grant()  # those behind it may fit now
            raise

    def until_done(self, item: asyncio.Future | None, size: int) -> None:
        """For a stream's item: the `size` bytes taken for it are given back when `item` is done,
        or at once when no item was made (reading it failed)."""
        if item is None:
            self.release(size)
        else:
            item.add_done_callback(lambda _: self.release(size))

    def release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][1]):
            granted, size = self._waiting.popleft()
            if not granted.cancelled():
                self.used += size
                granted.set_result(None)
