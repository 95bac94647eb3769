"""Residuals kept between an Evaluate and the Differentiate (VJP) that follows it.

A training step through a framework bridge asks for the value in its forward
pass and the VJP in its backward pass. Rather than run the forward sweep twice,
the Evaluate may ask the server to keep what the backward sweep needs
(engine.Plan.residuals) under a handle; the Differentiate then sends the handle
and its cotangents only. The store is bounded by count, bytes and age, the
least recently used set going first; a handle that expired or was evicted is
NOT_FOUND, and the client falls back to sending the inputs.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

from gradserve import engine

from .errors import ResidualsNotFound


class _Kept(NamedTuple):
    graph_id: str
    residuals: engine.Residuals
    expires: float


class ResidualStore:
    def __init__(self, max_sets: int, max_bytes: int, seconds: float, clock=time.monotonic):
        self.max_sets, self.max_bytes, self.seconds = max_sets, max_bytes, seconds
        self._clock = clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def keep(self, graph_id: str, residuals: engine.Residuals) -> str:
        """A new handle for `residuals`, or "" when they cannot be kept (the store is
        off, or they alone are over its byte limit)."""
        if self.max_sets <= 0 or residuals.nbytes > self.max_bytes:
            return ""
        handle = secrets.token_hex(16)
        with self._lock:
            self._expire()
            while self._kept and (len(self._kept) >= self.max_sets
                                  or self._bytes + residuals.nbytes > self.max_bytes):
                self._drop(next(iter(self._kept)))
            self._kept[handle] = _Kept(graph_id, residuals, self._clock() + self.seconds)
            self._bytes += residuals.nbytes
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

    def _expire(self) -> None:
        now = self._clock()
        for handle in [h for h, k in self._kept.items() if k.expires <= now]:
            self._drop(handle)

    def _drop(self, handle: str) -> None:
        kept = self._kept.pop(handle)
        self._bytes -= kept.residuals.nbytes
