"""Give the C heap's freed pages back to the system.

glibc's malloc keeps what a thread freed in that thread's arena, so one large allocation and
release (decoding a 25-Mpx image, loading and freezing a model's graph) leaves the process's
RSS at its high-water mark until something else reuses it. `return_freed_memory` hands it
back (malloc_trim); on other C libraries it does nothing.
"""

from __future__ import annotations

_malloc_trim = None


def return_freed_memory() -> None:
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = lambda pad: 0  # noqa: E731
    _malloc_trim(0)
