"""The server's threads, named at the operating-system level.

Python names its threads for itself only; `top -H`, `ps -L`, /proc and profilers see every
thread as "python" or "dxserve". Each pool here names its threads `dx-<role>` in the kernel
(Linux: /proc/self/task/<tid>/comm, 15 characters at most), so the CPU each stage burns can be
read off a running server: `dx-decode` (decoding, quality gate, preprocessing), `dx-model-<plugin>`
(the thread that calls the model; TensorFlow's own pools keep their names), `dx-explain`,
`dx-audit`. Elsewhere naming is skipped.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (cut to 15 characters) where the kernel shows it; best effort."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:  # not Linux, or /proc is not mounted
        pass


def named_pool(workers: int, role: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are named `role` in Python and `dx-<role>` in the kernel."""
    return ThreadPoolExecutor(workers, thread_name_prefix=role, initializer=name_os_thread, initargs=(f"dx-{role}",))
