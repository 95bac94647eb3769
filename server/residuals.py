"""Residuals kept between an Evaluate and the Differentiate (VJP) that follows it.

A training step through a framework bridge asks for the value in its forward
pass and the VJP in its backward pass. Rather than run the forward sweep twice,
the Evaluate may ask the server to keep what the backward sweep needs
(engine.Plan.residuals) under a handle; the Differentiate then sends the handle
and its cotangents only. The store is bounded by count, bytes and age, the
least recently used set going first; a handle that expired or was evicted is
NOT_FOUND, and the client falls back to sending the inputs. Expired sets are freed
by a timer (one daemon thread while sets are kept), not only by the next call that
touches the store: an idle server gives their memory back.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from gradserve import engine

from .errors import ResidualsNotFound


class _Kept(NamedTuple):
    graph_id: str
    residuals: engine.Residuals
    expires: float
    nbytes: int  # held_bytes


def held_bytes(residuals: engine.Residuals) -> int:
    """The memory `residuals` keep alive: each array's outermost base counted once (a
    one-element `slice` of a 128 MiB value holds the 128 MiB, where its own nbytes says
    4), and never less than the engine's own count."""
    roots: dict[int, int] = {}
    for value in residuals.values:
        if not isinstance(value, np.ndarray):
            continue
        root = value
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root.base is not None:  # a view of a buffer (bytes, mmap): its whole size
            try:
                roots[id(root.base)] = memoryview(root.base).nbytes
            except TypeError:
                roots[id(root)] = root.nbytes
        else:
            roots[id(root)] = root.nbytes
    return max(residuals.nbytes, sum(roots.values()))


class ResidualStore:
    def __init__(self, max_sets: int, max_bytes: int, seconds: float, clock=time.monotonic):
        self.max_sets, self.max_bytes, self.seconds = max_sets, max_bytes, seconds
        self._clock = clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    def keep(self, graph_id: str, residuals: engine.Residuals) -> str:
        """A new handle for `residuals`, or "" when they cannot be kept (the store is
        off, or they alone are over its byte limit)."""
        nbytes = held_bytes(residuals)
        if self.max_sets <= 0 or nbytes > self.max_bytes:
            return ""
        handle = secrets.token_hex(16)
        with self._lock:
            self._expire()
            while self._kept and (len(self._kept) >= self.max_sets
                                  or self._bytes + nbytes > self.max_bytes):
                self._drop(next(iter(self._kept)))
            self._kept[handle] = _Kept(graph_id, residuals, self._clock() + self.seconds, nbytes)
            self._bytes += nbytes
            if self._timer is None:
                self._schedule()
        return handle

    def get(self, handle: str, graph_id: str) -> engine.Residuals:
        with self._lock:
            self._expire()
            kept = self._kept.get(handle)
            if kept is None or kept.graph_id != graph_id:
                raise ResidualsNotFound(
                    "residuals handle is unknown, expired or evicted (kept at most "
                    f"{self.seconds:g} s, {self.max_sets:,} sets, {self.max_bytes:,} bytes): "
                    "send the inputs instead", field="residuals")
            self._kept.move_to_end(handle)
            return kept.residuals

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def close(self) -> None:
        """Drop every set and stop the timer."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._kept.clear()
            self._bytes = 0

    def _schedule(self) -> None:
        """Under the lock: a timer firing when the oldest set expires (sets are kept in
        order of use, so their expiry times are near that order; a later one is freed
        by the next firing)."""
        if self._closed or not self._kept:
            self._timer = None
            return
        first = min(k.expires for k in self._kept.values())
        self._timer = threading.Timer(max(0.0, first - self._clock()) + 0.05, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._expire()
            self._schedule()

    def _expire(self) -> None:
        now = self._clock()
        for handle in [h for h, k in self._kept.items() if k.expires <= now]:
            self._drop(handle)

    def _drop(self, handle: str) -> None:
        kept = self._kept.pop(handle)
        self._bytes -= kept.nbytes
