"""A tamper-evident audit trail of every request's outcome, in SQLite or PostgreSQL.

Each row records who asked (the caller's identity), about which image (the SHA-256 of its
bytes as sent, never pixels), which plugin, model version and weights answered, with what
(decision, probabilities, quality-gate reasons) or which error (status code), and how long it
took. Admin events (a reload, a change of default version) are rows too.

Rows are hash-chained: each stores the previous row's hash and its own, the SHA-256 of the
previous hash and its own content (its sequence number included). `verify` recomputes the
chain and names the first row that was edited, deleted or reordered. Rows cut from the end
leave no gap: keep the last hash that `dxserve audit verify` prints somewhere else to check
against.

Records are written off the event loop by one thread, many to a transaction. By default a
request waits for its record to be committed and fails (UNAVAILABLE) when it cannot be: no
result without a record (`audit_required = false` answers anyway and logs the failure).

Backends: SQLite (a file path; WAL, synchronous=FULL; several processes on one machine share
it safely) or PostgreSQL through psycopg 3 (a postgresql:// URL; replicas serialise their
appends with a transaction-scoped advisory lock, so one chain spans them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import math
import queue
import threading
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

from .threads import name_os_thread

log = logging.getLogger("dxserve.audit")

#: Columns, in order; `seq`, `prev_hash` and `hash` are the chain's own.
COLUMNS = ("seq", "time", "event", "caller", "method", "request_id", "specimen_id", "plugin", "model_version",
           "weights_sha256", "input_sha256", "decision", "probabilities", "quality", "status", "latency_ms", "detail",
           "prev_hash", "hash")
CONTENT = COLUMNS[:-2]
GENESIS = "0" * 64
ADVISORY_LOCK = 0x6478736572766531  # "dxserve1": the PostgreSQL chain's lock id
MAX_BATCH = 256
MAX_TEXT = 256  # characters kept of a client-chosen string (request id, plugin, ...) in a row


def row_hash(prev_hash: str, content: dict[str, Any]) -> str:
    """SHA-256 of the previous row's hash and this row's content as canonical JSON."""
    canonical = json.dumps([content.get(c) for c in CONTENT], separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()


def image_bytes(image) -> bytes | None:
    """A request's image as sent: the encoded file, or the raw pixels; None without one."""
    kind = image.WhichOneof("data") if image is not None else None
    return image.encoded if kind == "encoded" else image.raw.pixels if kind == "raw" else None


def input_sha256(image) -> str:
    """SHA-256 of a request's image as sent; "" without one."""
    data = image_bytes(image)
    return hashlib.sha256(data).hexdigest() if data is not None else ""


class Store:
    """Where rows go: `append` chains and commits a batch in one transaction."""

    placeholder = "?"

    def connect(self):
        raise NotImplementedError

    def __init__(self):
        self._connection = None

    @property
    def connection(self):
        if self._connection is None:
            self._connection = self.connect()
        return self._connection

    def append(self, records: list[dict]) -> None:
        try:
            self._append(records)
        except Exception:
            self.close()  # reconnect next time
            raise

    def _append(self, records: list[dict]) -> None:
        raise NotImplementedError

    def _chain(self, last: tuple | None, records: list[dict]) -> list[tuple]:
        seq, prev = (int(last[0]), last[1]) if last else (0, GENESIS)
        rows = []
        for record in records:
            seq += 1
            record["seq"] = seq  # told back to whoever waits for this record (AuditTrail.record)
            content = {**{c: None for c in CONTENT}, "time": now(), **record}
            digest = row_hash(prev, content)
            rows.append(tuple(content[c] for c in CONTENT) + (prev, digest))
            prev = digest
        return rows

    def _insert_sql(self) -> str:
        return f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join([self.placeholder] * len(COLUMNS))})"

    def head(self) -> tuple[int, str]:
        """(sequence number, hash) of the chain's last row; (0, GENESIS) when empty."""
        cursor = self.connection.cursor()
        cursor.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        last = cursor.fetchone()
        return (int(last[0]), last[1]) if last else (0, GENESIS)

    def rows(self, since: str = "") -> Iterator[dict]:
        """Every row in chain order (from `since`, an ISO time, when given)."""
        cursor = self.connection.cursor()
        where = f" WHERE time >= {self.placeholder}" if since else ""
        cursor.execute(f"SELECT {', '.join(COLUMNS)} FROM audit{where} ORDER BY seq", (since,) if since else ())
        for row in cursor:
            yield dict(zip(COLUMNS, row, strict=True))

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            finally:
                self._connection = None


SCHEMA = """CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY, time TEXT NOT NULL, event TEXT NOT NULL, caller TEXT, method TEXT, request_id TEXT,
    specimen_id TEXT, plugin TEXT, model_version TEXT, weights_sha256 TEXT, input_sha256 TEXT, decision TEXT,
    probabilities TEXT, quality TEXT, status TEXT, latency_ms DOUBLE PRECISION, detail TEXT,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"""


class SQLiteStore(Store):
    def __init__(self, path: str, min_free_bytes: int = 0):
        super().__init__()
        self.path = path
        self.min_free_bytes = min_free_bytes

    def connect(self):
        import sqlite3

        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(SCHEMA)
        return connection

    def _append(self, records: list[dict]) -> None:
        connection = self.connection
        self._check_free_space()
        connection.execute("BEGIN IMMEDIATE")  # the write lock first: other processes append after us
        try:
            last = connection.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            connection.executemany(self._insert_sql(), self._chain(last, records))
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):  # SQLite may have rolled back itself: the first error is the cause
                connection.execute("ROLLBACK")
            raise

    def _check_free_space(self) -> None:
        """Refuse cleanly before the disk is full: below `min_free_bytes` nothing is written."""
        if self.min_free_bytes:
            free = shutil.disk_usage(Path(self.path).resolve().parent).free
            if free < self.min_free_bytes:
                raise OSError(errno.ENOSPC, f"only {free // 2**20} MiB free on the audit disk, below its low-water mark "
                              f"of {self.min_free_bytes // 2**20} MiB (audit_min_free_mb)")


class PostgresStore(Store):
    placeholder = "%s"

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def connect(self):
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("a postgresql:// audit_db needs psycopg, which this install lacks: "
                               "pip install 'dxserve[postgres]'") from None
        connection = psycopg.connect(self.url, autocommit=False)
        with connection.transaction():
            connection.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")  # replicas creating it at once
            connection.execute(SCHEMA)
        return connection

    def _append(self, records: list[dict]) -> None:
        connection = self.connection
        with connection.transaction():
            connection.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")  # one appender at a time, over all replicas
            last = connection.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            with connection.cursor() as cursor:
                cursor.executemany(self._insert_sql(), self._chain(last, records))

    def rows(self, since: str = "") -> Iterator[dict]:
        with self.connection.transaction():
            yield from super().rows(since)

    def head(self) -> tuple[int, str]:
        with self.connection.transaction():  # a read's transaction ends with it
            return super().head()


def open_store(target: str, min_free_bytes: int = 0, must_exist: bool = False) -> Store:
    """A postgresql:// (or postgres://) URL, or a SQLite file path (`must_exist`: one that is
    there already; `min_free_bytes`: the disk's low-water mark for writes)."""
    if target.startswith(("postgresql://", "postgres://")):
        return PostgresStore(target)
    if must_exist and not Path(target).is_file():
        raise FileNotFoundError(f"no audit database at {target}")
    return SQLiteStore(target, min_free_bytes)


def verify(store: Store) -> tuple[int, str, list[str]]:
    """(rows checked, the last row's hash, problems): each problem names the row and what is wrong."""
    problems, prev, expected, count = [], GENESIS, 1, 0
    for row in store.rows():
        count += 1
        seq = int(row["seq"])
        if seq != expected:
            problems.append(f"rows {expected} to {seq - 1} are missing (deleted)" if seq > expected
                            else f"row {seq} is out of order (after row {expected - 1})")
        if row["prev_hash"] != prev:
            problems.append(f"row {seq}: its link to the previous row is broken (a row before it was edited, deleted or reordered)")
        if row_hash(row["prev_hash"], row) != row["hash"]:
            problems.append(f"row {seq}: its content does not match its hash (edited)")
        prev, expected = row["hash"], seq + 1
    return count, prev, problems


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class AuditUnavailable(Exception):
    """The record could not be committed."""


class AuditTrail:
    """Queues records from the event loop; one thread commits them in batches, and with a
    `checkpointer` (checkpoints.py) signs the chain head at start, every
    `checkpoint_interval_s` while rows are added, and at `close`.

    `failing` says why the last write failed ("" while writes succeed). While it fails, the
    writer tries again every `retry_s` with an `audit_gap` row that records the outage, so the
    trail becomes writable again, and says so, without waiting for a request; `on_change()` is
    called (from the writer thread) whenever `failing` or `stalled` changes.

    A write that has not returned after `stall_s` (a frozen disk, a hung database) marks the
    trail `stalled` until it returns (issue 32): `problem` then says so, like `failing`, and
    `record` refuses at once. Results waiting for their record are bounded: past `max_pending`
    records or `max_pending_bytes` of images still to hash, `record` refuses at once
    (AuditUnavailable: the caller answers UNAVAILABLE, retry later) instead of holding more.
    """

    def __init__(self, store: Store, required: bool = True, on_change: Callable[[], None] | None = None, retry_s: float = 1.0,
                 checkpointer=None, checkpoint_interval_s: float = 60.0, stall_s: float = 10.0, max_pending: int = 4096,
                 max_pending_bytes: int = 256 * 2**20):
        self.stall_s, self.max_pending, self.max_pending_bytes = stall_s, max_pending, max_pending_bytes
        self.stalled = ""  # why, while a write has run past stall_s
        self._writing_since: float | None = None
        self.pending, self.pending_bytes = 0, 0  # records queued or being written, and their images' bytes (event loop)
        self.store, self.required = store, required
        self.checkpointer, self.checkpoint_interval_s = checkpointer, checkpoint_interval_s
        self._checkpoint_due = time.monotonic() + checkpoint_interval_s
        self.failing = ""
        self.on_change = on_change
        self.retry_s = retry_s
        self._failing_since = ""
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()
        if stall_s:
            threading.Thread(target=self._watch, name="audit-watchdog", daemon=True).start()

    @property
    def problem(self) -> str:
        """Why records cannot be written now: the last write failed, or one is stalled ("": none)."""
        return self.failing or self.stalled

    def _watch(self) -> None:
        """The stall watchdog: a write running past `stall_s` marks the trail stalled."""
        while self._thread.is_alive():
            time.sleep(min(1.0, self.stall_s / 4))
            since = self._writing_since
            if since is not None and not self.stalled and time.monotonic() - since > self.stall_s:
                self.stalled = (f"an audit write has not returned for {self.stall_s:g} s (audit_stall_s): the disk or "
                                "database is stalled")
                log.error("audit trail stalled: health NOT_SERVING and records refused until the write returns",
                          extra={"stall_s": self.stall_s, "pending": self.pending})
                self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # the callback's bug must never stop the writer: every result waits on it
                log.exception("audit trail state change not reported")

    async def record(self, **record: Any) -> tuple[int, str] | None:
        """Commit one record: (its sequence number, the SHA-256 of its input image or ""), or
        None when it could not be written and records are not required (the failure is
        logged); raises AuditUnavailable when they are."""
        if self.stalled:
            raise AuditUnavailable(self.stalled)
        size = len(image_bytes(record.get("image")) or b"")
        if self.pending >= self.max_pending or self.pending_bytes + size > self.max_pending_bytes:
            raise AuditUnavailable(f"{self.pending} records ({self.pending_bytes / 2**20:.0f} MB of images) are waiting to be "
                                   f"written, the most it holds (audit_max_pending); the trail is slower than the requests")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending += 1
        self.pending_bytes += size
        done.add_done_callback(lambda _: self._written(size))
        self._queue.put((record, done, loop))
        try:
            return await asyncio.shield(done)  # a cancelled caller still leaves its record
        except AuditUnavailable:
            if self.required:
                raise
            return None

    def _written(self, size: int) -> None:
        self.pending -= 1
        self.pending_bytes -= size

    def _run(self) -> None:
        name_os_thread("dx-audit")
        # Written at once, so an unwritable trail is known (health NOT_SERVING) before any call is (issue 32).
        self._write([({"event": "server_start", "status": "OK", "detail": "the server started; its audit trail is writable"},
                      None, None)])
        self._checkpoint("start")
        while (item := self._next()) is not None:
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._write(batch)
            if self.checkpointer is not None and time.monotonic() >= self._checkpoint_due:  # under steady load too
                self._checkpoint("periodic")
        self._checkpoint("stop")

    def _next(self):
        """The next queued item; while failing, an `audit_gap` probe whenever none comes for `retry_s`."""
        while True:
            timeout = self.retry_s if self.failing else None
            if self.checkpointer is not None:
                timeout = min(timeout or math.inf, max(self._checkpoint_due - time.monotonic(), 0))
            try:
                return self._queue.get(timeout=timeout)
            except queue.Empty:
                if self.failing:
                    self._write([({"event": "audit_gap", "status": "OK", "detail": self._gap_detail()}, None, None)])
                if time.monotonic() >= self._checkpoint_due:
                    self._checkpoint("periodic")

    def _checkpoint(self, reason: str) -> None:
        """Sign the chain head (when it moved since the last one, or at start and stop)."""
        if self.checkpointer is None:
            return
        self._checkpoint_due = time.monotonic() + self.checkpoint_interval_s
        try:
            head = self.store.head()
            if reason == "periodic" and head == self.checkpointer.last:
                return
            prior = self.checkpointer.prior
            found = head[0] - self.checkpointer.rows  # the head before this server's own rows (its server_start row)
            if reason == "start" and prior is not None and found != prior[0]:  # never signed as if this server wrote them
                log.error("audit rows past the last signed checkpoint: this start does not vouch for them (verify reports "
                          "them)", extra={"last_signed_row": prior[0], "found": found, "rows": found - prior[0]})
            self.checkpointer.write(*head, reason)
        except Exception as error:  # the trail's own health covers the database; this is the file or the key
            log.error("audit checkpoint not written", extra={"reason": reason, "error": f"{type(error).__name__}: {error}"})

    def _gap_detail(self) -> str:
        return f"audit records could not be written from {self._failing_since}: {self.failing}"

    def _health(self, failure: Exception | None) -> None:
        reason = "" if failure is None else str(failure)
        if bool(reason) != bool(self.failing):
            if reason:
                self._failing_since = now()
            self.failing = reason
            self._changed()
        elif reason:
            self.failing = reason

    def _write(self, batch: list) -> None:
        records = []
        for record, _, _ in batch:
            image = record.pop("image", None)
            records.append({**record, "input_sha256": input_sha256(image) if image is not None else record.get("input_sha256")})
        written = list(records)  # batch order (an audit_gap row may go first)
        if self.failing and records[0]["event"] != "audit_gap":  # the first row after an outage says it was one
            records.insert(0, {"event": "audit_gap", "status": "OK", "detail": self._gap_detail()})
        started = self._writing_since = time.monotonic()
        try:
            self.store.append(records)
            failure = None
        except Exception as error:  # the database is down, the disk full, ...
            log.error("audit records not written", extra={"records": len(records), "error": f"{type(error).__name__}: {error}"})
            failure = AuditUnavailable(f"{type(error).__name__}: {error}")
        self._writing_since = None
        if failure is None and self.checkpointer is not None:
            self.checkpointer.count(len(records))  # what this writer appended, for the next checkpoint to sign
        if self.stalled:
            self.stalled = ""
            log.warning("stalled audit write returned", extra={"seconds": round(time.monotonic() - started, 1)})
            self._changed()
        log.debug("audit batch", extra={"records": len(records), "ms": round((time.monotonic() - started) * 1000, 2)})
        self._health(failure)
        waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, tuple[int, str]]]] = {}
        for (_, done, loop), record in zip(batch, written, strict=True):
            if done is not None:
                waiting.setdefault(loop, []).append((done, (record.get("seq", 0), record.get("input_sha256") or "")))
        for loop, futures in waiting.items():  # one wake-up of each event loop per batch, not one per record
            try:
                loop.call_soon_threadsafe(_settle, futures, failure)
            except RuntimeError:  # that loop has closed: nobody waits for these records any more
                pass

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is queued, then stop; a writer still blocked after `timeout_s` (a stalled
        disk) is left behind, said in the log, so that the server can stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("audit writer still blocked at stop: its queued records are not written", extra={
                "pending": self.pending, "stalled": self.stalled})
            return
        self.store.close()


def _settle(futures: list[tuple[asyncio.Future, tuple[int, str]]], failure: Exception | None) -> None:
    for done, written in futures:
        if done.cancelled():
            continue
        if failure is None:
            done.set_result(written)
        else:
            done.set_exception(failure)


def outcome_record(method: str, caller: str, request, request_id: str, outcome, latency_s: float) -> dict:
    """The record of one Classify call or stream item: `outcome` is the ClassifyResponse or the
    errors.ServingError it was answered with. The image itself is only hashed, in the writer thread."""
    clip = lambda text: text[:MAX_TEXT]  # noqa: E731  client-chosen strings never grow the trail without bound
    record = {"event": "classify", "method": method, "caller": clip(caller), "request_id": clip(request_id),
              "specimen_id": clip(request.specimen_id), "plugin": clip(request.plugin), "model_version": clip(request.model_version),
              "latency_ms": round(latency_s * 1000, 3), "image": request.image if request.HasField("image") else None}
    if hasattr(outcome, "code"):  # an error
        return {**record, "status": outcome.code.name, "detail": outcome.message[:4 * MAX_TEXT]}
    return {**record, "status": "OK", "model_version": outcome.model_version, "weights_sha256": outcome.weights_sha256,
            "decision": outcome.decision.label,
            "probabilities": json.dumps({p.label: round(float(p.probability), 6) for p in outcome.probabilities}),
            "quality": json.dumps([i.code for i in outcome.quality.issues])}
