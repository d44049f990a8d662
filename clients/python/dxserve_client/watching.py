"""`dxserve-client classify --watch`: image files sent once each, only when complete, across
restarts of the watcher.

A file counts as complete when its writer closes it (inotify's close-after-write, through
`watchdog`), when it is moved in, or, on platforms without close events, when its size and
modification time stay the same for one settle interval. What has been answered is appended to
a state file, so a restarted watcher does not send it again (a file sent but not answered when
the watcher stopped is sent again: at least once, never twice once answered).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .client import IMAGE_SUFFIXES
STATE_FILE = ".dxserve-client-sent.jsonl"


def signature(path: Path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, or None when it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class SentLog:
    """The files already answered, as JSON lines {path relative to the folder, size, mtime_ns}:
    a file rewritten since (another size or time) is a new image and is sent."""

    def __init__(self, path: Path, folder: Path):
        self.path, self.folder = path, folder
        self.sent: set[tuple[str, int, int]] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.sent.add((entry["path"], entry["size"], entry["mtime_ns"]))
                except (ValueError, KeyError):
                    continue  # a line cut short by a crash: that file is sent again
        self._lock = threading.Lock()

    def _key(self, file: Path, sig: tuple[int, int]) -> tuple[str, int, int]:
        return str(file.relative_to(self.folder)), *sig

    def __contains__(self, item: tuple[Path, tuple[int, int]]) -> bool:
        return self._key(*item) in self.sent

    def add(self, file: Path, sig: tuple[int, int]) -> None:
        key = self._key(file, sig)
        with self._lock:
            self.sent.add(key)
            with self.path.open("a") as out:
                out.write(json.dumps({"path": key[0], "size": key[1], "mtime_ns": key[2]}) + "\n")


class FolderWatch:
    """Iterating yields (path, signature) of complete image files under `folder`, each once,
    until `idle_exit_s` pass with nothing new and nothing in flight (None: forever).
    `answered(path, sig)` records one; `again(path, delay_s)` puts one back (still being written,
    or the server asked to retry later)."""

    def __init__(self, folder: Path, settle_s: float, idle_exit_s: float | None, log: SentLog | None):
        self.folder, self.settle_s, self.idle_exit_s, self.log = folder, settle_s, idle_exit_s, log
        self._ready: queue.Queue[tuple[Path, tuple[int, int]]] = queue.Queue()
        self._pending: dict[Path, tuple[tuple[int, int] | None, float]] = {}  # path -> (signature, since), settling
        self._retry: dict[Path, float] = {}  # path -> when to look again
        self._rechecks: dict[Path, tuple[tuple[int, int], float, Callable[[], None]]] = {}  # failed to decode: see below
        self._taken: set[tuple[Path, tuple[int, int]]] = set()  # yielded this run
        self._in_flight = 0
        self._lock = threading.Lock()
        self.last_activity = time.monotonic()

    # --- events (watchdog's thread) and the initial scan
    def _candidate(self, path: Path, complete: bool) -> None:
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            return
        with self._lock:
            if complete and path not in self._retry:
                sig = signature(path)
                if sig is not None:
                    self._offer(path, sig)
                return
            self._pending.setdefault(path, (signature(path), time.monotonic()))

    def _offer(self, path: Path, sig: tuple[int, int]) -> None:
        self._pending.pop(path, None)
        if (path, sig) in self._taken or (self.log is not None and (path, sig) in self.log):
            return
        self._taken.add((path, sig))
        self._in_flight += 1
        self.last_activity = time.monotonic()
        self._ready.put((path, sig))

    def _settle(self) -> None:
        """Pending files whose size and time held still for settle_s, retries now due, and
        files that failed to decode: sent again once they change, else their failure stands."""
        now = time.monotonic()
        gave_up = []
        with self._lock:
            for path, (sig, until, fail) in list(self._rechecks.items()):
                current = signature(path)
                if current is not None and current != sig:  # it was still being written: the whole file comes next
                    del self._rechecks[path]
                    self._in_flight -= 1
                    self._pending[path] = (current, now)
                elif now >= until:
                    del self._rechecks[path]
                    gave_up.append((path, sig, fail))
            for path, due in list(self._retry.items()):
                if now >= due:
                    del self._retry[path]
                    self._pending[path] = (signature(path), now)
            for path, (sig, since) in list(self._pending.items()):
                current = signature(path)
                if current is None:
                    del self._pending[path]
                elif current != sig:
                    self._pending[path] = (current, now)
                elif now - since >= self.settle_s:
                    self._offer(path, current)
        for path, sig, fail in gave_up:  # unchanged: really a damaged file
            fail()
            self.answered(path, sig)

    # --- the consumer
    def answered(self, path: Path, sig: tuple[int, int]) -> None:
        with self._lock:
            self._in_flight -= 1
            self.last_activity = time.monotonic()
        if self.log is not None:
            self.log.add(path, sig)

    def again(self, path: Path, sig: tuple[int, int], delay_s: float) -> None:
        with self._lock:
            self._in_flight -= 1
            self._taken.discard((path, sig))
            self._retry[path] = time.monotonic() + delay_s
            self.last_activity = time.monotonic()

    def recheck(self, path: Path, sig: tuple[int, int], within_s: float, fail: Callable[[], None]) -> None:
        """`path` failed to decode: if it changes within `within_s` it was still being written and
        its new content is sent; if not, `fail()` records the failure then."""
        with self._lock:
            self._rechecks[path] = (sig, time.monotonic() + within_s, fail)

    def _idle(self) -> bool:
        with self._lock:
            busy = self._in_flight or self._pending or self._retry or self._rechecks or not self._ready.empty()
        return (self.idle_exit_s is not None and not busy
                and time.monotonic() - self.last_activity >= self.idle_exit_s)

    def __iter__(self) -> Iterator[tuple[Path, tuple[int, int]]]:
        handler = _Handler(self)
        observer = Observer()
        observer.schedule(handler, str(self.folder), recursive=True)
        observer.start()
        try:
            for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
                self._candidate(path, complete=False)  # present already: complete once it holds still
            tick = min(self.settle_s / 2, 0.25)
            while not self._idle():
                self._settle()
                try:
                    yield self._ready.get(timeout=tick)
                except queue.Empty:
                    continue
        finally:
            observer.stop()
            observer.join(5)


class _Handler(FileSystemEventHandler):
    def __init__(self, watch: FolderWatch):
        self.watch = watch

    def on_any_event(self, event) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self.watch._candidate(Path(os.fsdecode(event.dest_path)), complete=True)
        elif isinstance(event, FileClosedEvent):  # closed after writing (not FileClosedNoWriteEvent)
            self.watch._candidate(Path(os.fsdecode(event.src_path)), complete=True)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self.watch._candidate(Path(os.fsdecode(event.src_path)), complete=False)
