"""How a ClassifyStream reads its requests: until the client half-closes, or the stream has
been idle or open too long (then it ends with a resume point; see errors.stream_ended).

While the server is crowded (nearly all of `max_concurrent_calls` taken), a stream that sent
fewer than `stream_min_items_when_full` items in the last `stream_idle_when_full_s` ends the
same way, so streams that send nothing, a byte now and then, or an image now and then cannot
hold the places other callers need (issue 32); the client resumes where it stopped."""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections import deque
from collections.abc import AsyncIterator, Callable

from .config import Settings

CROWDED_CHECK_S = 0.5  # how often a waiting stream looks again whether the server is crowded
#: RetryInfo of a stream ended to free its place: longer than the second a refused newcomer is told
#: to wait (errors.too_many_calls), so a client that honours it does not take the place straight back.
CROWD_RETRY_S = 2.0


async def requests_while_open(requests: AsyncIterator, settings: Settings, ended: list,
                              crowded: Callable[[], bool] | None = None):
    """A stream's requests, until the client half-closes, sends nothing for stream_idle_timeout_s,
    sends fewer than stream_min_items_when_full items in stream_idle_when_full_s while `crowded()`,
    or is max_stream_age_s old; 0 = no limit. When a limit ends it, `ended` gets (ErrorInfo
    reason, why, seconds to wait before resuming) for errors.stream_ended."""
    loop, iterator = asyncio.get_running_loop(), aiter(requests)
    idle, age = settings.stream_idle_timeout_s or math.inf, settings.max_stream_age_s or math.inf
    floor = (_RateFloor(loop.time(), settings.stream_idle_when_full_s, settings.stream_min_items_when_full, crowded)
             if crowded is not None and settings.stream_idle_when_full_s > 0 else None)
    closes = loop.time() + age
    # Each item is read in a task of its own (to time it), all in this one context: what reading
    # sets there (auth.py re-identifies the caller after a key-file reload) is adopted by the
    # reader below, so the items after it run with the caller's new rights (issue 32).
    reading = contextvars.copy_context()
    while True:
        since = loop.time()
        if min(idle, age) == math.inf and floor is None:
            nxt = anext(iterator)
            why = None
        else:  # asyncio.wait, not wait_for: a drain's cancellation must never be swallowed
            nxt = loop.create_task(anext(iterator), context=reading)
            why = await _wait(nxt, loop, since, idle, closes, age, floor)
        try:
            request = await nxt
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling() or why is None:
                raise  # the reader itself was cancelled (a drain)
            ended.append(why)
            return
        if floor is not None:
            floor.sent(loop.time())
        if why is None and isinstance(nxt, asyncio.Task):
            for variable, value in reading.items():
                if variable.get(None) is not value:
                    variable.set(value)
        yield request


class _RateFloor:
    """The items a stream sent within the last `window_s`, judged only while the server is crowded
    and the stream is waiting on its client: fewer than `min_items`, with the stream at least
    `window_s` old and its client silent for at least the gap the floor allows (window_s /
    min_items), gives its place up. The silence counts from when the server asked for the next
    item, so time a stream spent held back by the server (its window full) is never its own."""

    def __init__(self, opened: float, window_s: float, min_items: int, crowded: Callable[[], bool]):
        self.opened, self.window_s, self.min_items, self.crowded = opened, window_s, min_items, crowded
        self.times: deque[float] = deque(maxlen=min_items)

    def sent(self, now: float) -> None:
        self.times.append(now)

    def too_slow(self, now: float, waiting_since: float) -> bool:
        """Whether the stream, waiting on its client since `waiting_since`, falls short, asking
        `crowded()` (which counts a True answer as a stream leaving) only then."""
        if now - self.opened < self.window_s or now - waiting_since < self.window_s / self.min_items:
            return False
        recent = sum(t > now - self.window_s for t in self.times)
        return recent < self.min_items and self.crowded()

    def next_check(self, now: float, waiting_since: float) -> float:
        """When to look again: once the oldest counted item has left the window and the silence is
        long enough, or in CROWDED_CHECK_S."""
        due = max((self.times[0] if len(self.times) == self.min_items else self.opened) + self.window_s,
                  waiting_since + self.window_s / self.min_items)
        return max(due - now, CROWDED_CHECK_S)

    def why(self, now: float) -> tuple[str, str, float]:
        if not self.times or self.times[-1] <= now - self.window_s:
            return "STREAM_IDLE", (f"the stream sent nothing for {self.window_s:g} s while the server was full "
                                   "(stream_idle_when_full_s): its place goes to a caller that sends"), CROWD_RETRY_S
        return "STREAM_TOO_SLOW", (f"the stream sent fewer than {self.min_items} items in {self.window_s:g} s while the "
                                   "server was full (stream_min_items_when_full, stream_idle_when_full_s): its place "
                                   "goes to a caller that sends"), CROWD_RETRY_S


async def _wait(nxt: asyncio.Future, loop, since: float, idle: float, closes: float, age: float,
                floor: _RateFloor | None) -> tuple[str, str, float] | None:
    """Wait for `nxt` until a limit is reached; then cancel it and say which (None: it came)."""
    try:
        while not nxt.done():
            now = loop.time()
            if now >= closes:
                return "STREAM_MAX_AGE", f"the stream is {age:g} s old (max_stream_age_s)", 0.0
            if now - since >= idle:
                return "STREAM_IDLE", f"the stream sent nothing for {idle:g} s (stream_idle_timeout_s)", 0.0
            if floor is not None and floor.too_slow(now, since):
                return floor.why(now)
            step = min(closes, since + idle) - now
            if floor is not None:
                step = min(step, floor.next_check(now, since))
            await asyncio.wait((nxt,), timeout=max(step, 0))
        return None
    finally:
        if not nxt.done():
            nxt.cancel()
