"""Pages for the arrays a Client fetches (Client.get), used again once the program has
dropped them.

A large fetched tensor is assembled on pages of its own (gradserve.v1.chunks.empty).
Fresh pages cost the kernel's zeroing on first touch: ~10 ms of a 102 MB get's
~60 ms of client CPU on the 2-core box, paid again every step by a training loop
that fetches the same gradient shapes each time. A pool keeps the mappings of
dropped arrays and assembles the next tensor of the same size into one of them.

A mapping goes back to the pool only when nothing references it any more: the
array, every view of it, and numpy's memoryview of the mapping (the pool watches
that memoryview, the one object every view keeps alive). The pool keeps at most
the bytes of the largest fetch's such arrays (checked as the next array is made):
enough for a loop that fetches the same tensors every step, whether or not it still
holds the last step's while fetching; a program that gathered many fetches and
dropped them keeps one fetch's worth. `clear` (Client.close) gives them back.
"""

from __future__ import annotations

import collections
import math
import mmap
import threading
import weakref

import numpy as np

from gradserve.v1.chunks import OWN_PAGES_BYTES, own_pages


class PagePool:
    """`fetch()`: an allocate function for one fetch's Assembler; from OWN_PAGES_BYTES
    up, an array on a mapping of its own, taken from the pool when one of exactly its
    size is free."""

    def __init__(self):
        self._lock = threading.Lock()
        # Mappings whose arrays died, appended by _returning, which takes no lock: it
        # runs wherever the last reference goes, a collection inside a locked section
        # of this pool included.
        self._returned: collections.deque = collections.deque()
        self._free: list[mmap.mmap] = []  # sorted in by _settle; oldest first
        self._free_bytes = 0
        self.largest = 0  # the most bytes one fetch took on pages of their own
        self._closed = False

    def fetch(self):
        """allocate(shape, dtype) for one fetch (its bytes count toward `largest`)."""
        taken = 0

        def allocate(shape, dtype) -> np.ndarray:
            nonlocal taken
            dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes < OWN_PAGES_BYTES:
                return np.empty(shape, dtype)
            taken += nbytes
            return self._empty(shape, dtype, nbytes, taken)
        return allocate

    def _empty(self, shape, dtype, nbytes: int, taken: int) -> np.ndarray:
        with self._lock:
            self.largest = max(self.largest, taken)
            self._settle()
            pages = next((p for p in self._free if len(p) == nbytes), None)
            if pages is not None:
                self._free.remove(pages)
                self._free_bytes -= nbytes
        if pages is None:
            pages = own_pages(nbytes)
        flat = np.frombuffer(pages, np.uint8)
        # flat.base: numpy's memoryview of the mapping, released before this runs
        weakref.finalize(flat.base, self._returning, pages).atexit = False
        return flat.view(dtype).reshape(shape)

    def _returning(self, pages: mmap.mmap) -> None:
        if self._closed:
            pages.close()
        else:
            self._returned.append(pages)

    @property
    def free_bytes(self) -> int:
        """Bytes of mappings kept for the next arrays."""
        with self._lock:
            self._settle()
            return self._free_bytes

    def clear(self) -> None:
        """Give every kept mapping back to the system; later ones as they come back."""
        with self._lock:
            self._closed = True
            self._settle()

    def _settle(self) -> None:
        """Sort the returned mappings in; close what is over the largest fetch (or all,
        once cleared), oldest first. Called with the lock held."""
        while self._returned:
            pages = self._returned.popleft()
            self._free.append(pages)
            self._free_bytes += len(pages)
        limit = 0 if self._closed else self.largest
        while self._free_bytes > limit:
            oldest = self._free.pop(0)
            self._free_bytes -= len(oldest)
            oldest.close()
