"""The server process's resident memory: read from /proc, given back to the system
after large requests, and the guard that refuses new work while it is over a bound
(Limits.max_rss_bytes), so that a request whose memory was under-estimated makes the
server refuse calls (RESOURCE_EXHAUSTED, retried elsewhere) rather than be killed by
the kernel with every call in flight."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

from .allocator import keeping_freed_memory

_PAGE = os.sysconf("SC_PAGE_SIZE")
# Reading /proc costs ~10 us: admissions reuse a reading this recent.
READ_EVERY_SECONDS = 0.05
# Requests at least this large leave freed memory in glibc's heaps (grpc's receive
# buffers, the parsed tensors) that it keeps for reuse: trimmed after them.
TRIM_AFTER_BYTES = 8 << 20

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def trim() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim): 16 freed
    60 MiB requests otherwise stay +100-250 MiB in RSS. Not in a process that keeps
    freed memory for the next request (server.allocator, `gradserve serve`'s default):
    there the heap is meant to stay at its peak, bounded by the request limits."""
    if _malloc_trim is not None and not keeping_freed_memory():
        _malloc_trim(0)


class MemoryGuard:
    """`over()` is the RSS in bytes when it exceeds `limit` (after trimming the heap),
    else 0; a limit of 0 turns it off."""

    def __init__(self, limit: int):
        self.limit = limit
        self._read_at = -1.0
        self._rss = 0
        self._lock = threading.Lock()

    def over(self) -> int:
        if not self.limit:
            return 0
        now = time.monotonic()
        if now - self._read_at >= READ_EVERY_SECONDS:
            with self._lock:
                self._rss, self._read_at = rss_bytes(), now
                if self._rss > self.limit:  # maybe only freed memory glibc kept
                    trim()
                    self._rss = rss_bytes()
        return self._rss if self._rss > self.limit else 0
