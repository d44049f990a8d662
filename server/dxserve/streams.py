"""How a ClassifyStream reads its requests: until the client half-closes, or the stream has
been idle or open too long (then it ends with a resume point; see errors.stream_ended)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator


async def requests_while_open(requests: AsyncIterator, idle_s: float, age_s: float, ended: list):
    """A stream's requests, until the client half-closes, sends nothing for `idle_s`
    (stream_idle_timeout_s), or the stream is `age_s` old (max_stream_age_s); 0 = no limit.
    When a limit ends it, `ended` gets (ErrorInfo reason, why) for errors.stream_ended."""
    loop, iterator = asyncio.get_running_loop(), aiter(requests)
    idle, age = idle_s or math.inf, age_s or math.inf
    closes = loop.time() + age
    while True:
        timeout = min(idle, closes - loop.time())
        if timeout == math.inf:
            nxt = anext(iterator)
        else:  # asyncio.wait, not wait_for: a drain's cancellation must never be swallowed
            nxt = asyncio.ensure_future(anext(iterator))
            try:
                await asyncio.wait((nxt,), timeout=max(timeout, 0))
            finally:
                if not nxt.done():
                    nxt.cancel()
        try:
            request = await nxt
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the reader itself was cancelled (a drain)
            ended.append(("STREAM_IDLE", f"the stream sent nothing for {idle:g} s (stream_idle_timeout_s)")
                         if loop.time() < closes else ("STREAM_MAX_AGE", f"the stream is {age:g} s old (max_stream_age_s)"))
            return
        yield request
