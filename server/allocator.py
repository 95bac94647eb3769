"""glibc malloc thresholds for a server process: keep freed memory for the next request.

By default glibc serves every block over 128 KiB (its dynamic threshold grows to at
most 32 MiB) with a fresh mmap and returns it to the kernel on free, and trims the
heap's top above 128 KiB: so each 16 MiB request or reply is written into pages
the kernel must fault in and zero again, ~4,000 faults or ~20 ms of the server's
time per 16 MiB call on the 2-core machine (PERF-NOTES.md). With the thresholds
raised, freed blocks stay in the process and the next request reuses them.

The price: memory freed after a peak stays in the process (RSS stays near its
peak, up to the trim threshold above it) instead of going back to the kernel;
the server's memory bounds (max_intermediate_bytes, max_message_bytes, ...) still
bound that peak. Blocks over the mmap threshold (32 MiB, glibc's largest) are
still mapped and unmapped per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before trimming

_keeping = False  # whether keep_freed_memory took effect in this process


def keeping_freed_memory() -> bool:
    """Whether this process keeps freed memory for reuse (server.memory then does not
    trim the heap after large requests: that would undo it)."""
    return _keeping


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD,
                      trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module's
    docstring); False where the C library is not glibc or refuses a value."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    global _keeping
    _keeping = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)
                    and mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return _keeping
