"""How a ClassifyStream reads its requests: until the client half-closes, or the stream has
been idle or open too long (then it ends with a resume point; see errors.stream_ended).

While the server is crowded (nearly all of `max_concurrent_calls` taken), a stream idle for
`stream_idle_when_full_s` ends the same way, so streams that send nothing (or a byte now and
then) cannot hold the places other callers need (issue 32); the client resumes where it stopped."""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import AsyncIterator, Callable

CROWDED_CHECK_S = 0.5  # how often a waiting stream looks again whether the server is crowded


async def requests_while_open(requests: AsyncIterator, idle_s: float, age_s: float, ended: list,
                              crowded: Callable[[], bool] | None = None, crowded_idle_s: float = 0.0):
    """A stream's requests, until the client half-closes, sends nothing for `idle_s`
    (stream_idle_timeout_s), or for `crowded_idle_s` while `crowded()` (stream_idle_when_full_s),
    or the stream is `age_s` old (max_stream_age_s); 0 = no limit. When a limit ends it, `ended`
    gets (ErrorInfo reason, why) for errors.stream_ended."""
    loop, iterator = asyncio.get_running_loop(), aiter(requests)
    idle, age = idle_s or math.inf, age_s or math.inf
    watch_crowd = crowded is not None and crowded_idle_s > 0
    closes = loop.time() + age
    # Each item is read in a task of its own (to time it), all in this one context: what reading
    # sets there (auth.py re-identifies the caller after a key-file reload) is adopted by the
    # reader below, so the items after it run with the caller's new rights (issue 32).
    reading = contextvars.copy_context()
    while True:
        since = loop.time()
        if min(idle, age) == math.inf and not watch_crowd:
            nxt = anext(iterator)
            why = None
        else:  # asyncio.wait, not wait_for: a drain's cancellation must never be swallowed
            nxt = loop.create_task(anext(iterator), context=reading)
            why = await _wait(nxt, loop, since, idle, closes, age, crowded if watch_crowd else None, crowded_idle_s)
        try:
            request = await nxt
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling() or why is None:
                raise  # the reader itself was cancelled (a drain)
            ended.append(why)
            return
        if why is None and isinstance(nxt, asyncio.Task):
            for variable, value in reading.items():
                if variable.get(None) is not value:
                    variable.set(value)
        yield request


async def _wait(nxt: asyncio.Future, loop, since: float, idle: float, closes: float, age: float, crowded,
                crowded_idle_s: float) -> tuple[str, str] | None:
    """Wait for `nxt` until a limit is reached; then cancel it and say which (None: it came)."""
    try:
        while not nxt.done():
            now = loop.time()
            if now >= closes:
                return "STREAM_MAX_AGE", f"the stream is {age:g} s old (max_stream_age_s)"
            if now - since >= idle:
                return "STREAM_IDLE", f"the stream sent nothing for {idle:g} s (stream_idle_timeout_s)"
            if crowded is not None and now - since >= crowded_idle_s and crowded():
                return "STREAM_IDLE", (f"the stream sent nothing for {crowded_idle_s:g} s while the server was full "
                                       "(stream_idle_when_full_s): its place goes to a caller that sends")
            step = min(closes, since + idle) - now
            if crowded is not None:
                step = min(step, max(since + crowded_idle_s - now, CROWDED_CHECK_S))
            await asyncio.wait((nxt,), timeout=max(step, 0))
        return None
    finally:
        if not nxt.done():
            nxt.cancel()
