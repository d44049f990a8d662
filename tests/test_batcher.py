"""Dynamic batching with a fake model, in process."""

import asyncio
import threading

import grpc
import numpy as np
import pytest

from dxserve import InputSpec, ModelRuntime, ModelVersion, PluginInfo
from dxserve.batcher import Batcher
from dxserve.errors import ServingError


class FakeRuntime(ModelRuntime):
    info = PluginInfo("fake", "0", "", ("a", "b"), InputSpec(""), "")

    def __init__(self, gate: threading.Event | None = None):
        super().__init__(ModelVersion("1", None, ""))
        self.batches: list[int] = []
        self.gate = gate
        self.entered = threading.Event()  # set once the worker is inside predict

    def predict(self, batch):
        self.entered.set()
        if self.gate:
            self.gate.wait(5)
        if np.any(batch < 0):
            raise ValueError("negative input")
        self.batches.append(len(batch))
        p = batch.reshape(len(batch), -1)[:, :1].clip(0, 1)
        return np.hstack([p, 1 - p])


def run(coro):
    return asyncio.run(coro)


async def until_in_predict(runtime: FakeRuntime) -> None:
    """Wait (not a fixed sleep: CI machines are slow) until the worker is blocked in predict."""
    for _ in range(500):
        if runtime.entered.is_set():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the batcher never called predict")


async def _with_batcher(runtime, coro, **kwargs):
    options = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue_size": 100, **kwargs}
    batcher = Batcher("fake", runtime, **options)
    batcher.start()
    try:
        return await coro(batcher)
    finally:
        await batcher.stop()


def test_concurrent_items_share_batches_up_to_the_limit():
    runtime = FakeRuntime()

    async def go(batcher):
        results = await asyncio.gather(*(batcher.submit(np.array([i / 20])) for i in range(20)))
        return results

    results = run(_with_batcher(runtime, go))
    assert sorted(runtime.batches, reverse=True)[:2] == [8, 8] and sum(runtime.batches) == 20
    assert [round(r.probabilities[0], 3) for r in results] == [round(i / 20, 3) for i in range(20)]
    assert all(r.batch_size in runtime.batches for r in results)


def test_lone_item_waits_at_most_max_wait():
    runtime = FakeRuntime()

    async def go(batcher):
        return await asyncio.wait_for(batcher.submit(np.array([0.5])), 2)

    result = run(_with_batcher(runtime, go, max_wait_s=0.01))
    assert runtime.batches == [1] and result.queued_ms < 1000


def test_full_queue_is_resource_exhausted():
    gate = threading.Event()
    runtime = FakeRuntime(gate)

    async def go(batcher):
        first = asyncio.ensure_future(batcher.submit(np.array([0.1])))
        await until_in_predict(runtime)
        waiting = [asyncio.ensure_future(batcher.submit(np.array([0.1]))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ServingError) as caught:
            await batcher.submit(np.array([0.1]))
        gate.set()
        await asyncio.gather(first, *waiting)
        return caught.value

    error = run(_with_batcher(runtime, go, max_queue_size=2))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancelled_and_expired_items_never_reach_the_model():
    gate = threading.Event()
    runtime = FakeRuntime(gate)

    async def go(batcher):
        first = asyncio.ensure_future(batcher.submit(np.array([0.1])))
        await until_in_predict(runtime)
        gone = asyncio.ensure_future(batcher.submit(np.array([0.2])))
        late = asyncio.ensure_future(batcher.submit(np.array([0.3]), timeout_s=0.01))
        kept = asyncio.ensure_future(batcher.submit(np.array([0.4])))
        await asyncio.sleep(0.05)
        gone.cancel()
        gate.set()
        await first
        with pytest.raises(ServingError) as caught:
            await late
        await kept
        return caught.value, batcher.dropped

    error, dropped = run(_with_batcher(runtime, go))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dropped == 2
    assert runtime.batches == [1, 1]  # first, then kept alone


def test_inputs_of_different_sizes_queued_together_each_get_their_answer():
    """A plugin whose preprocess keeps each image's size (the default) gets one model call per
    size: the queued items cannot be stacked into one batch, and none may be left unanswered."""
    runtime = FakeRuntime()
    sizes = [(2, 2), (3, 5), (2, 2), (3, 5), (1, 1)]

    async def go(batcher):
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(np.full(s, (i + 1) / 10)) for i, s in enumerate(sizes))), 10)

    results = run(_with_batcher(runtime, go))
    assert [round(r.probabilities[0], 3) for r in results] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert sorted(runtime.batches) == [1, 2, 2] and sorted({r.batch_size for r in results}) == [1, 2]


def test_an_item_that_breaks_predict_fails_alone():
    runtime = FakeRuntime()

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit(np.array([v])) for v in (0.1, -1.0, 0.3)), return_exceptions=True)

    good1, bad, good2 = run(_with_batcher(runtime, go))
    assert isinstance(bad, ServingError) and bad.code == grpc.StatusCode.INTERNAL
    assert "negative input" in bad.message
    assert good1.probabilities[0] == pytest.approx(0.1) and good2.probabilities[0] == pytest.approx(0.3)


def test_wrong_output_shape_is_an_internal_error():
    class Wrong(FakeRuntime):
        def predict(self, batch):
            return np.ones((len(batch), 3))

    async def go(batcher):
        return await asyncio.gather(batcher.submit(np.array([0.1])), return_exceptions=True)

    (error,) = run(_with_batcher(Wrong(), go))
    assert error.code == grpc.StatusCode.INTERNAL and "shape" in error.message


def test_a_full_queue_refuses_unary_calls_before_decoding_and_makes_stream_items_wait():
    """Places are taken before any decoding: without one a unary call is refused at once,
    a stream item waits (its stream stops reading) and goes on when a place frees up."""

    async def go(batcher):
        held = [batcher.admit(wait=False) for _ in range(2)]
        for place in held:
            await place.__aenter__()
        with pytest.raises(ServingError) as caught:
            async with batcher.admit(wait=False):
                pass
        entered = asyncio.Event()

        async def stream_item():
            async with batcher.admit(wait=True):
                entered.set()

        waiting = asyncio.ensure_future(stream_item())
        await asyncio.sleep(0.1)
        assert not entered.is_set() and batcher.in_flight == 3
        await held[0].__aexit__(None, None, None)
        await asyncio.wait_for(waiting, 5)
        await held[1].__aexit__(None, None, None)
        return caught.value, batcher.in_flight

    error, in_flight = run(_with_batcher(FakeRuntime(), go, max_queue_size=2))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and in_flight == 0


def test_background_model_work_waits_for_requests_on_their_way_and_for_batches():
    """ModelTurns: an explanation's pass never runs while a request is admitted (pending) or a
    batch runs, and a batch waits for at most the one pass already running."""
    import threading

    from dxserve.batcher import ModelTurns

    pending = [1]
    turns = ModelTurns(lambda: pending[0])
    order, entered = [], threading.Event()

    def background():
        with turns.background():
            order.append("background")
            entered.set()

    worker = threading.Thread(target=background)
    worker.start()
    assert not entered.wait(0.2)  # a request is on its way to the model: the pass waits
    with turns.foreground():
        order.append("batch")
        pending[0] = 0
    assert entered.wait(5)
    worker.join()
    assert order == ["batch", "background"]

    done = threading.Event()

    def batch():
        with turns.foreground():
            done.set()

    with turns.background():  # a batch arriving during a pass runs right after it
        arriving = threading.Thread(target=batch)
        arriving.start()
        assert not done.wait(0.1)
    assert done.wait(5)
    arriving.join()


def test_decode_turns_go_round_the_callers_not_first_come():
    """Issue 32: one caller's queued images made every other caller wait behind them all. With
    FairTurns a freed thread goes to the next caller in turn: B's one image runs second, not
    after A's twenty; a cancelled wait gives its place up, and a turn granted as its waiter was
    cancelled is passed on, never lost."""
    from dxserve.guard import FairTurns

    async def scenario():
        turns, ran = FairTurns(1), []
        gate = asyncio.Event()

        async def work(caller: str, n: int):
            async with turns.turn(caller):
                ran.append(f"{caller}{n}")
                await gate.wait()

        first = asyncio.ensure_future(work("A", 0))
        await asyncio.sleep(0)
        flood = [asyncio.ensure_future(work("A", n)) for n in range(1, 21)]
        await asyncio.sleep(0)
        late = asyncio.ensure_future(work("B", 0))
        gone = asyncio.ensure_future(work("C", 0))
        await asyncio.sleep(0)
        gone.cancel()  # C's caller left before its turn
        gate.set()
        await asyncio.gather(first, late, *flood)
        assert ran[:3] == ["A0", "A1", "B0"] and "C0" not in ran and len(ran) == 22
        assert turns.free == 1 and not turns._waiting  # every turn given back
    asyncio.run(scenario())
