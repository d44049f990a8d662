"""Fault injection: what the server promises still holds, and health tells the truth, when
a plugin hangs, the audit trail cannot be written, or the port is taken."""

from __future__ import annotations

import asyncio
import threading
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess
from dxserve_client import Client, DxServeError
from test_lifecycle import light_server

YELLOW = np.zeros((8, 8, 3), np.uint8) + np.array([255, 255, 0], np.uint8)  # the hang plugin hangs on it
MAGENTA = np.zeros((8, 8, 3), np.uint8) + np.array([255, 0, 255], np.uint8)  # its preprocessing hangs on it
GREY = np.full((8, 8, 3), 120, np.uint8)
HANG = ("--plugins", "dxserve_testplugins.hang", "--predict-timeout-s", "1")


def health(client: Client, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def loaded(client: Client, plugin: str, timeout_s: float = 30) -> None:
    """Once the server listens and `plugin` has loaded (READY or not: health may say NOT_SERVING)."""
    def ready() -> bool:
        try:
            client.wait_until_loaded(plugin, 1)
            return True
        except (DxServeError, TimeoutError):
            return False

    wait_for(ready, timeout_s, f"{plugin} to load")


def wait_for(condition, timeout_s: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_hung_plugin_is_marked_unresponsive_fails_fast_and_recovers(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    with light_server(tmp_path, *HANG, ready=("brightness", "hang"), env={"DXSERVE_HANG_FILE": str(hold)}) as server, \
            Client(server.address, timeout_s=30) as client:
        assert client.classify(GREY, plugin="hang").ok
        started = time.monotonic()
        with pytest.raises(DxServeError) as caught:  # the watchdog answers it after predict_timeout_s
            client.classify(YELLOW, plugin="hang")
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "VERSION_UNRESPONSIVE")
        assert time.monotonic() - started < 10
        assert health(client, "dxserve.v1.DiagnosticsService/hang") == "NOT_SERVING"
        assert health(client) == "SERVING"  # the other plugins serve
        started = time.monotonic()
        with pytest.raises(DxServeError) as caught:  # refused at once while the call hangs, not queued behind it
            client.classify(GREY, plugin="hang")
        assert caught.value.reason == "VERSION_UNRESPONSIVE" and time.monotonic() - started < 0.9
        listed = next(p for p in client.list_plugins() if p.name == "hang")
        assert listed.model_versions[0].state == 5 and "predict_timeout_s" in listed.model_versions[0].state_reason
        assert client.classify(GREY, plugin="brightness").ok
        assert '"model call hung; version marked unresponsive"' in server.logs()

        hold.unlink()  # the hung call returns
        wait_for(lambda: health(client, "dxserve.v1.DiagnosticsService/hang") == "SERVING", what="recovery")
        assert client.classify(GREY, plugin="hang").ok and client.classify(YELLOW, plugin="hang").ok
    assert '"hung model call returned; version serves again"' in server.logs()


def stops_past_hung_calls(server) -> str:
    """SIGTERM: exit 0 within the grace (3 s here), not waiting for plugin calls that never return,
    having said so; the server's logs."""
    stopped = time.monotonic()
    server.process.send_signal(15)
    assert server.process.wait(20) == 0
    assert time.monotonic() - stopped < 8, "it waited for the hung call"
    logs = server.logs()
    assert "exiting past plugin calls that never returned" in logs
    return logs


def test_hung_preprocessing_costs_its_version_not_the_decode_pool(tmp_path):
    """Issue 32: preprocessing that never returns held a decode thread for good; with two hung
    (decode_threads 2) every plugin stopped. Now each is abandoned past predict_timeout_s: its
    request UNAVAILABLE, its version unresponsive until it returns, the pool replaced, and the
    other plugins served throughout; SIGTERM exits within the grace."""
    import concurrent.futures

    hold = tmp_path / "hold"
    hold.touch()
    server = ServerProcess("--disabled-plugins", "lymphoblast", *HANG, "--decode-threads", "2", "--grace-period-s", "3",
                           tmp=tmp_path, env={"DXSERVE_HANG_FILE": str(hold)})
    try:
        with Client(server.address, timeout_s=30) as client:
            client.wait_until_serving("hang", 60)
            client.wait_until_serving("brightness", 60)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both decode threads taken
                hung = [pool.submit(client.classify, MAGENTA, plugin="hang") for _ in range(2)]
                for call in hung:
                    with pytest.raises(DxServeError) as caught:
                        call.result(30)
                    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "VERSION_UNRESPONSIVE")
                    assert "preprocessing has run over 1 s" in str(caught.value)
            assert all(client.classify(GREY, plugin="brightness").ok for _ in range(5))  # the pool is whole again
            assert health(client, "dxserve.v1.DiagnosticsService/hang") == "NOT_SERVING" and health(client) == "SERVING"
            with pytest.raises(DxServeError) as caught:  # its version refuses fast: no more calls go in to hang
                client.classify(GREY, plugin="hang")
            assert caught.value.reason == "VERSION_UNRESPONSIVE"
            hold.unlink()  # the hung calls return
            wait_for(lambda: health(client, "dxserve.v1.DiagnosticsService/hang") == "SERVING", what="recovery")
            assert client.classify(GREY, plugin="hang").ok
            hold.touch()  # and once more, never to return: the server still stops
            with pytest.raises(DxServeError):
                client.classify(MAGENTA, plugin="hang")
        logs = stops_past_hung_calls(server)
        assert '"preprocessing hung; version marked unresponsive"' in logs and "pool replaced" in logs
    finally:
        server.stop()


def test_sigterm_finishes_within_the_grace_period_with_a_hung_plugin(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()  # never removed: the model call never returns
    server = ServerProcess("--disabled-plugins", "lymphoblast", *HANG, "--grace-period-s", "3", tmp=tmp_path,
                           env={"DXSERVE_HANG_FILE": str(hold)})
    try:
        with Client(server.address, timeout_s=30) as client:
            client.wait_until_serving("hang", 60)
            with pytest.raises(DxServeError):
                client.classify(YELLOW, plugin="hang")
        stops_past_hung_calls(server)
    finally:
        server.stop()


def test_an_audit_trail_below_its_low_water_mark_refuses_cleanly_and_health_says_so(tmp_path):
    # A low-water mark above any disk's free space: the trail is "full" from the first write.
    with light_server(tmp_path, "--audit-min-free-mb", str(2**40), ready=[]) as server, Client(server.address) as client:
        loaded(client, "brightness")  # never SERVING: the trail's start row already failed
        with pytest.raises(DxServeError) as caught:
            client.classify(GREY, plugin="brightness")
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
        assert "below its low-water mark" in caught.value.message  # the cause, not a secondary error
        wait_for(lambda: health(client) == "NOT_SERVING", what="health to report the trail")
        assert health(client, "dxserve.v1.DiagnosticsService/brightness") == "NOT_SERVING"
        assert health(client, "dxserve.v1.Liveness") == "SERVING"  # alive: a restart would not free the disk
    assert '"audit trail cannot be written: health NOT_SERVING until it can"' in server.logs()


def test_an_unwritable_audit_trail_is_not_serving_before_any_call(tmp_path):
    """Issue 32: the trail is written at start (a server_start row), so a trail that cannot be
    written is NOT_SERVING from the first seconds, with no call needed to find out."""
    with light_server(tmp_path, "--audit-min-free-mb", str(2**40), ready=[]) as server, Client(server.address) as client:
        loaded(client, "brightness")
        wait_for(lambda: '"audit trail cannot be written' in server.logs(), 30, "the trail's state at start")
        assert health(client) == "NOT_SERVING" and health(client, "dxserve.v1.DiagnosticsService/brightness") == "NOT_SERVING"
        assert health(client, "dxserve.v1.Liveness") == "SERVING"
    assert "below its low-water mark" in server.logs()


def test_a_writable_trail_starts_with_a_server_start_row(tmp_path):
    import sqlite3

    with light_server(tmp_path) as server:
        pass
    first = sqlite3.connect(server.audit_path).execute("SELECT seq, event FROM audit ORDER BY seq LIMIT 1").fetchone()
    assert first == (1, "server_start")


def test_a_stalled_audit_write_is_seen_bounded_and_never_holds_the_stop():
    """Issue 32: a frozen disk held every result (and its image) and kept health SERVING; SIGTERM
    waited for the disk. Now a write past `stall_s` marks the trail stalled (health reads
    `problem`), new records are refused at once, waiting ones are bounded in count and bytes,
    and `close` gives up on a blocked writer after its timeout."""
    import threading

    from dxserve.audit import AuditTrail, AuditUnavailable, Store
    from dxserve.v1 import diagnostics_pb2 as pb

    class Frozen(Store):
        def __init__(self):
            super().__init__()
            self.thawed, self.rows_written = threading.Event(), []
            self.thawed.set()

        def connect(self):
            return object()

        def append(self, records):
            self.thawed.wait()
            self.rows_written.extend(records)

    store, changes = Frozen(), []
    trail = AuditTrail(store, on_change=lambda: changes.append(trail.problem), stall_s=0.3, max_pending=3,
                       max_pending_bytes=1000)
    image = pb.Image(encoded=b"x" * 400)

    async def scenario():
        await trail.record(event="classify", status="OK")  # writes while the disk works
        store.thawed.clear()  # the disk freezes
        waiting = [asyncio.ensure_future(trail.record(event="classify", status="OK", image=image)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(AuditUnavailable, match="audit_max_pending"):  # 800 + 400 bytes of images > 1000
            await trail.record(event="classify", status="OK", image=image)
        wait_for(lambda: trail.stalled, 5, "the watchdog")
        assert "audit_stall_s" in trail.problem and changes and "stalled" in changes[-1]
        with pytest.raises(AuditUnavailable, match="stalled"):  # refused at once, not queued behind the frozen write
            await trail.record(event="classify", status="OK")
        store.thawed.set()  # the disk returns
        assert all(written is not None for written in await asyncio.gather(*waiting))  # written once the disk returns
        assert len(store.rows_written) >= 3
        wait_for(lambda: not trail.stalled, 5, "the stall to clear")
        assert changes[-1] == "" and trail.pending == 0 and trail.pending_bytes == 0
        store.thawed.clear()  # frozen again, for good
        asyncio.ensure_future(trail.record(event="classify", status="OK"))
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    started = time.monotonic()
    trail.close(timeout_s=0.5)  # the server's stop, with a frozen disk
    assert time.monotonic() - started < 3
    store.thawed.set()


def test_the_audit_trail_recovers_by_itself_and_records_its_outage():
    """A store that fails, then works: `failing` says why, the writer probes until it can
    write again (no request needed), and the first row after says there was a gap."""
    from dxserve.audit import AuditTrail, AuditUnavailable, Store

    class Flaky(Store):
        def __init__(self):
            super().__init__()
            self.broken, self.rows_written = True, []

        def connect(self):
            return object()

        def append(self, records):
            if self.broken:
                raise OSError(28, "No space left on device")
            self.rows_written.extend(records)

    store, changes, made = Flaky(), [], {}
    # The writer's first write (its server_start row) may fail before `trail` is assigned here.
    trail = AuditTrail(store, on_change=lambda: changes.append(made["trail"].failing if made else "before"), retry_s=0.05)
    made["trail"] = trail

    async def scenario():
        with pytest.raises(AuditUnavailable, match="No space left on device"):
            await trail.record(event="classify", status="OK")
        assert "No space left on device" in trail.failing
        store.broken = False
        wait_for(lambda: not trail.failing, 5, "the probe to succeed")

    asyncio.run(scenario())
    trail.close()
    assert changes[0] in ("OSError: [Errno 28] No space left on device", "before") and changes[-1] == ""
    gap = store.rows_written[0]
    assert gap["event"] == "audit_gap" and "No space left on device" in gap["detail"]


def test_a_second_server_on_a_port_in_use_is_refused(tmp_path):
    with light_server(tmp_path) as server:
        second = subprocess.run([sys.executable, "-m", "dxserve.cli", "serve", "--address", server.address,
                                 "--disabled-plugins", "lymphoblast", "--audit-db", ""], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "the address is in use" in second.stderr


def test_a_taken_http_or_metrics_port_is_a_clear_exit_not_a_half_server(tmp_path):
    """The HTTP door and metrics are on by default (issue 31): a port of theirs already taken ends
    the start with exit 1 and the port named, rather than a server without its door."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flag, words in (("--http-port", f"cannot listen for HTTP on 127.0.0.1:{port}"), ("--metrics-port", f"port {port}")):
            started = subprocess.run([sys.executable, "-m", "dxserve.cli", "serve", "--address", "127.0.0.1:0", flag, port,
                                      "--disabled-plugins", "lymphoblast", "--audit-db", "", "--log-format", "json"],
                                     capture_output=True, text=True, timeout=60)
            assert started.returncode == 1, started.stderr[-2000:]
            assert words in started.stderr, started.stderr[-2000:]


def test_audit_verify_on_a_missing_database_fails_and_creates_nothing(tmp_path, capsys):
    from dxserve.cli import main

    missing = tmp_path / "nope.sqlite3"
    assert main(["audit", "verify", "--db", str(missing)]) == 2
    assert not missing.exists() and "no audit database" in capsys.readouterr().err


def test_explanations_have_their_own_bounded_places_and_never_hold_up_classification(tmp_path):
    """One caller may hold 2 explanations, the server 3; past either, RESOURCE_EXHAUSTED with
    RetryInfo at once (not a long wait), while plain calls are answered meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from dxserve.auth import KeyFile

    keys = KeyFile.load(tmp_path / "callers.json")
    tokens = [keys.add("a", []), keys.add("b", []), keys.add("c", [])]
    keys.save()
    flags = ("--plugins", "dxserve_testplugins.hang", "--auth-keys-file", str(tmp_path / "callers.json"),
             "--max-queued-explanations", "3", "--max-explanations-per-caller", "2")
    with light_server(tmp_path, *flags, ready=[], env={"DXSERVE_HANG_FILE": str(tmp_path / "never")}) as server:
        clients = [Client(server.address, token=t, timeout_s=60) for t in tokens]
        clients[2].wait_until_serving("hang", 60)

        def explain(k: int):
            try:
                return clients[k].classify(GREY, plugin="hang", explain=True).explanation is not None
            except DxServeError as error:
                return error

        with ThreadPoolExecutor(5) as pool:
            a = [pool.submit(explain, 0) for _ in range(3)]  # a: 2 admitted, the third refused (a's limit)
            time.sleep(0.3)
            b = [pool.submit(explain, 1) for _ in range(2)]  # b: 1 admitted, 1 refused (the server's 3 are taken)
            time.sleep(0.3)
            plain = clients[2].classify(GREY, plugin="hang")  # c, without explain: answered while they run
            running = sum(not f.done() for f in a + b)
            outcomes = [f.result() for f in a + b]
        assert plain.ok and running >= 2
        refused = [o for o in outcomes if isinstance(o, DxServeError)]
        assert sum(o is True for o in outcomes) == 3 and len(refused) == 2
        assert {(o.code, o.reason) for o in refused} == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "EXPLANATIONS_FULL")}
        subjects = sorted(d.violations[0].subject for o in refused for d in o.details if d.DESCRIPTOR.name == "QuotaFailure")
        assert subjects == ["caller:a", "server"]
        assert all(any(d.DESCRIPTOR.name == "RetryInfo" for d in o.details) for o in refused)
        assert clients[0].classify(GREY, plugin="hang", explain=True).explanation is not None  # places come back
        for c in clients:
            c.close()


def _callers(tmp_path, *names):
    from dxserve.auth import KeyFile

    keys = KeyFile.load(tmp_path / "callers.json")
    tokens = {name: keys.add(name, []) for name in names}
    keys.save()
    return keys, tokens


def test_a_token_revoked_while_its_stream_is_open_stops_at_its_next_item(tmp_path):
    import signal

    keys, tokens = _callers(tmp_path, "lab", "other")
    revoked = threading.Event()

    def images(n: int, revoke_after: int | None):
        for i in range(n):
            if i == revoke_after:
                keys.callers = [c for c in keys.callers if c["name"] != "lab"]
                keys.save()
                server.process.send_signal(signal.SIGHUP)
                time.sleep(1.0)  # the reload is done
                revoked.set()
            yield (f"{i}", GREY)
            time.sleep(0.05)

    with light_server(tmp_path, "--auth-keys-file", str(tmp_path / "callers.json"), ready=[]) as server, \
            Client(server.address, token=tokens["lab"]) as lab, Client(server.address, token=tokens["other"]) as other:
        other.wait_until_serving("brightness", 30)
        got = []
        with pytest.raises(DxServeError) as caught:
            for result in lab.classify_stream(images(20, revoke_after=5), plugin="brightness"):
                got.append(result.request_id)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in caught.value.message
        assert got == [str(i) for i in range(5)]  # nothing after the revocation was answered
        assert [r.ok for r in other.classify_stream(images(3, None), plugin="brightness")] == [True] * 3  # others serve on


def test_an_idle_stream_ends_with_its_resume_point_and_the_client_resumes(tmp_path):
    def images(pause_after: int):
        for i in range(5):
            if i == pause_after:
                time.sleep(2.5)  # past stream_idle_timeout_s
            yield (f"{i}", GREY)

    with light_server(tmp_path, "--stream-idle-timeout-s", "1") as server, Client(server.address) as client:
        with pytest.raises(DxServeError) as caught:
            list(client.classify_stream(images(2), plugin="brightness"))
        assert (caught.value.code, caught.value.reason, caught.value.resume_index) == (grpc.StatusCode.UNAVAILABLE, "STREAM_IDLE", 2)
        resumed = list(client.classify_stream(images(2), plugin="brightness", resume_within_s=10))
        assert [r.request_id for r in resumed] == [str(i) for i in range(5)] and all(r.ok for r in resumed)


def test_idle_streams_give_their_places_up_when_the_server_is_full(tmp_path):
    """Issue 32: streams that send nothing (or a byte now and then) filled every call place and
    health said SERVING while a new caller got 21 of 21 refused. With the server full, a stream
    idle for stream_idle_when_full_s ends STREAM_IDLE with its resume point until a place is
    free again; the other streams, and any stream while the server is not full, keep theirs. Its
    caller, calling again at once (ignoring its RetryInfo), is refused GAVE_WAY: the freed place
    goes to another caller."""
    import threading

    from dxserve.v1 import diagnostics_pb2_grpc as pb_grpc

    release, ended = threading.Event(), []

    def silent():  # a stream that never sends
        release.wait(30)
        return
        yield

    _, tokens = _callers(tmp_path, "holder", "newcomer")
    holder = (("authorization", f"Bearer {tokens['holder']}"),)

    def hold(stub):
        try:
            for _ in stub.ClassifyStream(silent(), timeout=30, metadata=holder):
                pass
            ended.append("OK")
        except grpc.RpcError as error:
            ended.append((error.code(), error.details()))

    with light_server(tmp_path, "--max-concurrent-calls", "4", "--stream-idle-when-full-s", "1", "--stream-idle-timeout-s",
                      "300", "--auth-keys-file", str(tmp_path / "callers.json"), ready=[]) as server, \
            grpc.insecure_channel(server.address) as channel, Client(server.address, token=tokens["newcomer"]) as client, \
            Client(server.address, token=tokens["holder"]) as again:
        client.wait_until_serving("brightness", 30)
        stub = pb_grpc.DiagnosticsServiceStub(channel)
        holders = [threading.Thread(target=hold, args=(stub,)) for _ in range(4)]
        for thread in holders:
            thread.start()
        wait_for(lambda: ended, 15, "an idle stream to give its place up")
        assert all(code == grpc.StatusCode.UNAVAILABLE and "stream_idle_when_full_s" in details for code, details in ended)
        with pytest.raises(DxServeError) as caught:  # its caller, at once, ignoring the 2 s of its RetryInfo
            again.classify(GREY, plugin="brightness")
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "GAVE_WAY")
        assert 0 < caught.value.retry_after_s <= 2.0
        assert client.classify(GREY, plugin="brightness").ok  # a place for a caller that sends
        evicted = len(ended)  # only while the server is full: once a place is free, the others keep theirs
        release.set()
        for thread in holders:
            thread.join(10)
        assert evicted == 1 and ended[1:] == ["OK"] * 3  # one at a time: one place was all it took
        # Below the crowd mark, an idle stream keeps its place (the ordinary 300 s idle limit).
        ended.clear()
        release.clear()
        lone = threading.Thread(target=hold, args=(stub,))
        lone.start()
        time.sleep(2.5)
        assert ended == []
        release.set()
        lone.join(10)
        assert ended == ["OK"]


def test_trickling_streams_give_their_places_up_when_the_server_is_full(tmp_path):
    """Issue 32: a minimum useful rate. An image now and then held a place as well as silence
    did; with the server full, a stream that sent fewer than stream_min_items_when_full items in
    stream_idle_when_full_s ends STREAM_TOO_SLOW with its resume point, and its answered items
    stay answered. Below the crowd mark the same trickle keeps its place."""
    import threading

    release, ended, answered = threading.Event(), [], []

    def trickle():  # one image a second: 2 in a 2 s window, under the floor of 3
        i = 0
        while not release.is_set():
            yield (str(i), GREY)
            i += 1
            release.wait(1.0)

    def hold(client):
        try:
            answered.append(sum(r.ok for r in client.classify_stream(trickle(), plugin="brightness")))
            ended.append("OK")
        except DxServeError as error:
            ended.append((error.code, error.reason, error.resume_index, str(error), error.retry_after_s))

    _, tokens = _callers(tmp_path, "holder", "newcomer")
    with light_server(tmp_path, "--max-concurrent-calls", "4", "--stream-idle-when-full-s", "2",
                      "--stream-min-items-when-full", "3", "--stream-idle-timeout-s", "300",
                      "--auth-keys-file", str(tmp_path / "callers.json"), ready=[]) as server, \
            Client(server.address, token=tokens["holder"]) as holding, Client(server.address, token=tokens["newcomer"]) as client:
        client.wait_until_serving("brightness", 30)
        holders = [threading.Thread(target=hold, args=(holding,)) for _ in range(4)]
        for thread in holders:
            thread.start()
        wait_for(lambda: ended, 15, "a trickling stream to give its place up")
        code, reason, resume, message, retry = ended[0]
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_TOO_SLOW") and resume >= 2
        assert "stream_min_items_when_full" in message
        assert retry == 2.0  # longer than a refused newcomer's 1 s: a client that honours it gives the place up
        assert client.classify(GREY, plugin="brightness").ok  # a place for a caller that sends
        time.sleep(3)  # no longer full: the other three trickle on
        release.set()
        for thread in holders:
            thread.join(10)
        assert len(ended) == 4 and ended[1:] == ["OK"] * 3 and all(n >= 5 for n in answered)


def test_a_callers_request_rate_is_capped_unary_refused_streams_slowed(tmp_path):
    with light_server(tmp_path, "--max-requests-per-s-per-caller", "5") as server, Client(server.address) as client:
        outcomes = []
        for _ in range(15):
            try:
                outcomes.append(client.classify(GREY, plugin="brightness").ok)
            except DxServeError as error:
                outcomes.append(error.reason)
        assert outcomes[:5] == [True] * 5 and "RATE_LIMITED" in outcomes
        streamed = list(client.classify_stream([(str(i), GREY) for i in range(12)], plugin="brightness"))
        assert [r.request_id for r in streamed] == [str(i) for i in range(12)] and all(r.ok for r in streamed)


def test_reduced_rights_reach_an_open_stream_at_its_next_item_under_the_default_limits(tmp_path):
    """Issue 32: with the default idle and age limits, each stream item was read in a task of its
    own, so the caller that reading re-identified after a reload never reached the items: a
    caller whose plugins were reduced kept its old rights on its open stream."""
    import signal

    keys, tokens = _callers(tmp_path, "lab")
    keys.callers[0]["plugins"] = ["brightness", "tiles"]
    keys.save()

    def images(n: int, reduce_after: int):
        for i in range(n):
            if i == reduce_after:
                keys.callers[0]["plugins"] = ["tiles"]
                keys.save()
                server.process.send_signal(signal.SIGHUP)
                time.sleep(1.0)  # the reload is done
            yield (f"{i}", GREY)
            time.sleep(0.05)

    with light_server(tmp_path, "--auth-keys-file", str(tmp_path / "callers.json"), ready=[]) as server, \
            Client(server.address, token=tokens["lab"]) as lab:
        lab.wait_until_serving("brightness", 30)
        results = list(lab.classify_stream(images(10, reduce_after=4), plugin="brightness"))
    assert [r.ok for r in results[:4]] == [True] * 4
    assert [r.error_code for r in results[4:]] == ["PERMISSION_DENIED"] * 6  # each item after, refused in-band


def test_failed_logins_are_counted_logged_and_recorded_but_a_flood_is_aggregated(tmp_path):
    import urllib.request

    from conftest import free_port
    from dxserve.audit import open_store

    _, tokens = _callers(tmp_path, "lab")
    metrics_port = free_port()
    with light_server(tmp_path, "--auth-keys-file", str(tmp_path / "callers.json"), "--metrics-port", str(metrics_port),
                      ready=[None]) as server:
        for token in [None] + ["dxs_bogus"] * 30:
            with Client(server.address, token=token) as client, pytest.raises(DxServeError) as caught:
                client.classify(GREY, plugin="brightness")
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'dxserve_auth_refused_total{reason="unknown_token"} 30.0' in body
        assert 'dxserve_auth_refused_total{reason="no_credentials"} 1.0' in body
    refused = [r for r in open_store(str(server.audit_path)).rows() if r["event"] == "refused"]
    assert sorted(r["status"] for r in refused) == ["UNAUTHENTICATED", "UNAUTHENTICATED"]  # one row per cause
    assert all(r["caller"].startswith("ipv4:127.0.0.1") for r in refused)
    assert server.logs().count('"calls refused"') == 2


def test_a_refusal_flood_from_many_addresses_is_one_row_a_minute(monkeypatch):
    """Issue 32: garbage calls from many anonymous addresses wrote a trail row per address; now
    one per reason and window, naming how many peers and the most frequent. The window is read
    on a clock the test moves, so a slow machine (the flood taking longer than the window) cannot
    split it."""
    import types

    from dxserve import auth, errors
    from dxserve.auth import Refusals

    clock = [0.0]
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    rows = []

    class Trail:
        async def record(self, **row):
            rows.append(row)

    async def flood():
        refusals = Refusals(Trail(), window_s=0.3)
        error = errors.unauthenticated("unknown or revoked token", "unknown_token")
        for i in range(5000):
            refusals.refused("unknown_token", f"ipv4:10.0.{i // 250}.{i % 250}", error)
        refusals.refused("no_credentials", "ipv4:10.9.9.9", errors.unauthenticated("no token", "no_credentials"))
        await asyncio.sleep(0)
        clock[0] += 0.35
        refusals.refused("unknown_token", "ipv4:10.0.0.1", error)  # the window has passed: the next report
        await asyncio.sleep(0)

    asyncio.run(flood())
    assert [r["caller"] for r in rows] == ["ipv4:10.0.0.0", "ipv4:10.9.9.9", "1001 peers"]  # 1000 named, then "others"
    assert "5000 call(s) refused (unknown_token)" in rows[-1]["detail"] and "others (3999)" in rows[-1]["detail"]


def test_a_failing_state_callback_never_stops_the_audit_writer(tmp_path):
    """The writer reports the trail's state through `on_change`; a callback that raises (e.g. the
    server's, called before the server holds the trail) is logged and the writer goes on: every
    result waits on it, so a dead writer would hang the server."""
    from dxserve.audit import AuditTrail, AuditUnavailable, SQLiteStore

    store = SQLiteStore(str(tmp_path / "a.sqlite3"), min_free_bytes=2**62)  # "full" from the first write

    def broken_callback():
        raise AttributeError("no trail yet")

    trail = AuditTrail(store, on_change=broken_callback, retry_s=0.05)

    async def scenario():
        with pytest.raises(AuditUnavailable):
            await asyncio.wait_for(trail.record(event="classify", status="OK"), 10)  # answered, not hung
        store.min_free_bytes = 0
        wait_for(lambda: not trail.failing, 10, "the probe to succeed")
        assert (await asyncio.wait_for(trail.record(event="classify", status="OK"), 10))[0] > 0

    asyncio.run(scenario())
    trail.close()


def test_a_key_file_that_fails_to_parse_refuses_everyone_until_fixed(tmp_path):
    """Issue 32: a malformed key file on SIGHUP used to keep the old one in force, revoked tokens
    included. Now it fails closed and loudly: every caller UNAUTHENTICATED, open streams end at
    their next item, health NOT_SERVING, a metric and an ERROR line; a fixed file serves again."""
    import signal

    keys, tokens = _callers(tmp_path, "lab")
    good = keys.path.read_text()
    with light_server(tmp_path, "--auth-keys-file", str(keys.path), ready=[]) as server, \
            Client(server.address, token=tokens["lab"]) as lab:
        lab.wait_until_serving("brightness", 30)
        assert lab.classify(GREY, plugin="brightness").ok
        keys.path.write_text(good.replace('"callers"', '"callers" oops'))  # an edit that breaks the JSON
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: health(lab) == "NOT_SERVING", 10, "health to say so")
        with pytest.raises(DxServeError) as caught:
            lab.classify(GREY, plugin="brightness")
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert '"key file cannot be read: every caller is refused' in server.logs()
        keys.path.write_text(good)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: health(lab) == "SERVING", 10, "health to recover")
        assert lab.classify(GREY, plugin="brightness").ok


def test_an_idle_open_inference_stream_ends_too(tmp_path):
    """Issue 32: ModelStreamInfer ignored stream_idle_timeout_s and max_stream_age_s; a stream
    that goes quiet now ends UNAVAILABLE (STREAM_IDLE) after what it sent was answered."""
    from dxserve.inference import serialize_bytes
    from dxserve.oip import grpc_service_pb2 as oip
    from dxserve.oip import grpc_service_pb2_grpc as oip_grpc
    from dxserve_client.client import encode_png

    def requests():
        for i in range(3):
            if i == 2:
                time.sleep(2.5)  # past stream_idle_timeout_s
            yield oip.ModelInferRequest(model_name="brightness", id=f"r{i}", raw_input_contents=[serialize_bytes([encode_png(GREY)])],
                                        inputs=[oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])])

    with light_server(tmp_path, "--stream-idle-timeout-s", "1") as server, grpc.insecure_channel(server.address) as channel:
        answers = []
        with pytest.raises(grpc.RpcError) as caught:
            for answer in oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=30):
                answers.append(answer)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "sent nothing for 1 s" in caught.value.details()
        assert [a.infer_response.id for a in answers] == ["r0", "r1"] and not any(a.error_message for a in answers)


def test_an_unavailable_error_tells_a_fractional_retry_delay():
    """UNAVAILABLE's RetryInfo carries the delay it was given, fractions included: it was cut to
    whole seconds (0.25 s became "retry at once")."""
    from dxserve import errors

    error = errors.unavailable("lymphoblast", "loading", "PLUGIN_LOADING", retry_after_s=1.25)
    (retry,) = [d for d in error.details if d.DESCRIPTOR.name == "RetryInfo"]
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 250_000_000)
    assert not [d for d in errors.unavailable("p", "d", "R").details if d.DESCRIPTOR.name == "RetryInfo"]


def test_an_answered_error_does_not_keep_the_images_of_the_frames_it_was_raised_in():
    """A 25 Mpx field refused TOO_MANY_OBJECTS kept its 91 crops alive through the error's
    traceback (a reference cycle the garbage collector freed late, if ever): the server's RSS grew
    about 40 MB a request (benchmarks/memory.py: +431 MB after 8 smears). An error kept as a call's
    answer holds no frames, and a call ends with its status set, not aborted: grpc.aio keeps an
    abort's exception in the call's state, and with it the handler's frame and request (+150 MB
    over 40 refused 5 MB images)."""
    import asyncio
    import gc
    import weakref

    from dxserve import errors
    from dxserve.config import Settings
    from dxserve.service import DiagnosticsService
    from dxserve.v1 import diagnostics_pb2 as pb

    class Crops:  # what a field's search holds in its frame when it refuses
        pass

    kept = []

    async def refuse(request, request_id, timeout, method):
        crops = Crops()
        kept.append(weakref.ref(crops))
        raise errors.invalid_field("image", "TOO_MANY_OBJECTS", f"found {len([crops])} objects")

    class Context:  # a grpc.aio context: the call's status is set, never aborted (abort keeps its exception)
        def __init__(self):
            self.code = self.details = self.trailing = None

        def time_remaining(self):
            return None

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

        def set_trailing_metadata(self, metadata):
            self.trailing = dict(metadata)

        async def abort_with_status(self, status):
            raise AssertionError("aborted: grpc.aio's call state keeps the AbortError, whose traceback holds the request")

    service = DiagnosticsService({}, Settings(audit_db=""))
    service._classify = refuse
    gc.disable()
    try:
        outcome = asyncio.run(service.answer(pb.ClassifyRequest(plugin="smear-field"), "r", None, "Classify"))
        assert isinstance(outcome, errors.ServingError) and outcome.code == grpc.StatusCode.INVALID_ARGUMENT
        assert kept[0]() is None  # freed when the search's frame ended, though its error is still held
        context = Context()
        assert asyncio.run(service.Classify(pb.ClassifyRequest(plugin="smear-field"), context)) is None
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "found 1 objects" in context.details
        assert "grpc-status-details-bin" in context.trailing  # the typed details, as abort_with_status sends them
        assert kept[1]() is None
    finally:
        gc.enable()
        service.close()


def test_the_stream_rate_floor_counts_only_the_clients_own_silence():
    """A stream the server held back (its window full) for longer than the floor's window, then
    waiting a moment for its client, is not 'too slow': the silence counts from when the server
    asked for the next item. A client silent for the floor's gap (window / items) while it sent
    too few in the window is."""
    from dxserve.streams import _RateFloor

    crowded = []
    floor = _RateFloor(opened=0.0, window_s=10.0, min_items=2, crowded=lambda: crowded.append(1) or True)
    for t in (0.0, 0.1, 0.2, 0.3):  # a fast client, then the server's window is full until t = 30
        floor.sent(t)
    assert not floor.too_slow(30.5, waiting_since=30.0) and not crowded  # held back, not slow; crowded() not asked
    assert floor.next_check(30.5, 30.0) == pytest.approx(4.5)  # its own silence of 5 s is the earliest
    assert floor.too_slow(35.0, waiting_since=30.0) and crowded == [1]  # 5 s silent, nothing in the last 10 s
    floor.sent(35.1)
    assert floor.why(36.0)[0] == "STREAM_TOO_SLOW" and floor.why(46.0)[0] == "STREAM_IDLE"
    assert not floor.too_slow(39.0, waiting_since=35.1)  # one item 4 s ago: silent less than the gap


def test_requests_held_are_bounded_streams_wait_unary_calls_are_refused(tmp_path):
    """Four streams of 10 MB images held 3.7 GB: a stream reads ahead and every request is kept
    until answered. With max_inflight_mb reached, a stream reads no further (its items all come
    back, in order, once some are answered) and a unary call is refused INFLIGHT_FULL with when
    to retry; nothing else changes."""
    import threading

    hold = tmp_path / "hold"
    hold.touch()
    big = lambda colour: np.zeros((450, 450, 3), np.uint8) + np.array(colour, np.uint8)  # noqa: E731  607 KB raw
    from conftest import free_port

    http_port = free_port()
    with light_server(tmp_path, "--plugins", "dxserve_testplugins.hang", "--predict-timeout-s", "60",
                      "--max-inflight-mb", "1", "--http-port", str(http_port), ready=("brightness", "hang"),
                      env={"DXSERVE_HANG_FILE": str(hold)}) as server, Client(server.address, timeout_s=60) as client:
        lone = []  # first one stream of one hanging item: 0.6 MB held, room left for small calls
        first = threading.Thread(target=lambda: lone.extend(client.classify_stream([("lone", big((255, 0, 255)))],
                                                                                  plugin="hang")))
        first.start()
        time.sleep(1.0)
        assert client.classify(GREY, plugin="brightness").ok  # 219 bytes fit beside it
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)  # a chunked body: no declared length
        connection.request("POST", "/v2/models/brightness/infer", body=iter([b'{"inputs": []}']),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        answer = connection.getresponse()
        assert answer.status == 429 and b"max_inflight_mb" in answer.read()  # held at its most (max_body): refused unread
        connection.close()

        streamed = []
        items = [("0", big((255, 0, 255)))] + [(str(i), big((128, 128, 128))) for i in range(1, 6)]  # the first hangs
        stream = threading.Thread(target=lambda: streamed.extend(client.classify_stream(items, plugin="hang")))
        stream.start()
        time.sleep(1.5)  # its first item waits for room behind the lone one, the rest unread
        with pytest.raises(DxServeError) as caught:
            client.classify(big((100, 100, 100)), plugin="brightness")
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "INFLIGHT_FULL")
        assert any(d.DESCRIPTOR.name == "RetryInfo" for d in caught.value.details) and "max_inflight_mb" in str(caught.value)
        with pytest.raises(DxServeError) as caught:  # in turn: not even a small call goes ahead of the waiting stream
            client.classify(GREY, plugin="brightness")
        assert caught.value.reason == "INFLIGHT_FULL"
        hold.unlink()
        first.join(30)
        stream.join(30)
        assert [r.request_id for r in lone] == ["lone"] and lone[0].ok
        assert [r.request_id for r in streamed] == [str(i) for i in range(6)] and all(r.ok for r in streamed)
        assert client.classify(big((100, 100, 100)), plugin="brightness").ok  # room again


def test_the_inflight_budget_grants_in_turn_lets_an_oversized_request_go_alone_and_survives_cancellation():
    import asyncio

    from dxserve.inflight import InflightBytes

    async def scenario():
        budget = InflightBytes(100)
        assert budget.try_take(60) and not budget.try_take(50)  # 110 > 100
        first, second = asyncio.ensure_future(budget.take(50)), asyncio.ensure_future(budget.take(10))
        await asyncio.sleep(0)
        assert not first.done() and not second.done()  # the second fits, but waits its turn
        assert not budget.try_take(1)  # a unary call does not go ahead of waiting streams
        budget.release(60)
        await asyncio.sleep(0)
        assert first.done() and second.done() and budget.used == 60
        huge = asyncio.ensure_future(budget.take(500))  # larger than the whole budget: alone, once nothing is held
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(budget.take(1))
        await asyncio.sleep(0)
        cancelled.cancel()  # gone from the queue, nothing held
        await asyncio.gather(cancelled, return_exceptions=True)
        budget.release(50)
        budget.release(10)
        await asyncio.sleep(0)
        assert huge.done() and budget.used == 500
        budget.release(500)
        assert budget.used == 0 and budget.try_take(100)
        granted = asyncio.ensure_future(budget.take(30))
        await asyncio.sleep(0)
        budget.release(100)  # granted now, but its waiter is cancelled before it runs: the bytes come back
        granted.cancel()
        await asyncio.gather(granted, return_exceptions=True)
        assert budget.used == 0
        await budget.take(40)
        budget.until_done(None, 40)  # an item that could not be made gives its bytes back at once
        assert budget.used == 0
        await budget.take(40)
        item = asyncio.get_running_loop().create_future()
        budget.until_done(item, 40)  # a stream's item holds them until it is answered
        assert budget.used == 40
        item.set_result(None)
        await asyncio.sleep(0)
        assert budget.used == 0

    asyncio.run(scenario())


def test_an_evicted_stream_resumes_after_its_retry_delay_and_loses_nothing(tmp_path):
    """The Python client resumes a stream the full server ended (STREAM_TOO_SLOW) after the 2 s
    it is asked to wait: a newcomer gets the place meanwhile (before any stream could have ended
    by itself), and every item of every stream is answered once, in order."""
    import threading

    def trickle():
        for i in range(14):
            yield (str(i), GREY)
            time.sleep(0.7)  # about 10 s a stream: fewer than 3 items in 2 s

    results, newcomer = {}, []

    def hold(k, client):
        results[k] = [r.request_id for r in client.classify_stream(trickle(), plugin="brightness", resume_within_s=30)]

    _, tokens = _callers(tmp_path, "holder", "newcomer")
    with light_server(tmp_path, "--max-concurrent-calls", "4", "--stream-idle-when-full-s", "2",
                      "--stream-min-items-when-full", "3", "--auth-keys-file", str(tmp_path / "callers.json"), ready=[]) as server, \
            Client(server.address, token=tokens["holder"]) as holding, Client(server.address, token=tokens["newcomer"]) as client:
        client.wait_until_serving("brightness", 30)
        holders = [threading.Thread(target=hold, args=(k, holding)) for k in range(4)]
        started = time.monotonic()
        for thread in holders:
            thread.start()
        time.sleep(1.0)  # the four streams hold every place
        while not newcomer and time.monotonic() - started < 8:  # no stream ends by itself before about 10 s
            try:
                newcomer.append(client.classify(GREY, plugin="brightness").ok)
            except DxServeError as error:
                assert error.reason == "TOO_MANY_CALLS"
                time.sleep(error.retry_after_s)
        for thread in holders:
            thread.join(40)
        assert newcomer == [True]  # a place was given up for it
        assert results == {k: [str(i) for i in range(14)] for k in range(4)}  # and the evicted stream resumed, losing nothing
