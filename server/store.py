"""The tensor store: tensors kept on this server process under a handle, so that a
request names them (StoredTensor) instead of sending them.

A client puts a tensor set once, in chunks (PutTensors: a set of any size up to the
store's bounds, each chunk within the message limit), and later requests name the
handle: a big model's parameters, a training state that TrainSteps updates in
place, a data set whose rows TrainSteps reads, a derivative too large for one reply
(DifferentiateRequest.store_results) fetched back in chunks (GetTensors).

Bounds, as GetServerInfo reports them: bytes in all (max_store_bytes) and per
client address (max_store_bytes_per_client), handles (max_store_handles), and an
expiry after store_seconds unused. Bytes are counted as the graph cache counts
(server.registry): the data plus what holding it costs beyond the data, measured
(bench/bench_store_memory.py) and rounded up. To make room the least recently used
handles go first, the putting client's own before others'. A handle this process no
longer holds is NOT_FOUND naming the field; the client puts the tensors again.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from gradserve.engine import ResourceLimitError
from gradserve.v1.chunks import Assembler

from .errors import BadRequest, LimitExceeded, StateConflict, StoredNotFound

# What a kept tensor and a handle cost beyond the tensors' data, as
# bench/bench_store_memory.py measures the resident set (~250 B per tensor: the array
# object, its name and dict slot; ~680 B per handle: entry, lock, dicts), doubled.
STORE_BYTES_PER_TENSOR = 512
STORE_BYTES_PER_HANDLE = 2048
VELOCITY = "velocity/"  # a training state's momentum buffers: VELOCITY + parameter name


def tensor_nbytes(tensors: dict) -> int:
    """What a handle holding `tensors` is counted as."""
    return (STORE_BYTES_PER_HANDLE + STORE_BYTES_PER_TENSOR * len(tensors)
            + sum(a.nbytes for a in tensors.values()))


@dataclass(eq=False)
class Entry:
    """One handle's tensors. `lock` serializes the TrainSteps calls stepping it;
    `version` counts its updates; `replies` holds the last two updates' replies (by
    the version each stepped from) for a retry of either call (server.training)."""

    handle: str
    owner: str
    tensors: dict
    nbytes: int
    expires: float
    version: int = 0
    steps: int = 0
    replies: tuple = ()  # the last two updates' (version stepped from, reply), newest last
    lock: threading.Lock = field(default_factory=threading.Lock)


class TensorStore:
    def __init__(self, max_bytes: int, max_bytes_per_client: int, max_handles: int,
                 seconds: float, clock=time.monotonic):
        self.max_bytes, self.max_bytes_per_client = max_bytes, max_bytes_per_client
        self.max_handles, self.seconds = max_handles, seconds
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._bytes = 0  # held and reserved (puts in progress)
        self._by_owner: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- bounds -----------------------------------------------------------------------

    def reserve(self, owner: str, nbytes: int, field_name: str) -> None:
        """Count `nbytes` more for `owner` (a put in progress, a state that grew),
        evicting least recently used handles (the owner's first) to make room;
        LimitExceeded when the bounds cannot hold them at all."""
        if not self.max_bytes:
            raise LimitExceeded("the server keeps no tensors (max_store_bytes is 0)",
                                field=field_name)
        with self._lock:
            owned = self._by_owner.get(owner, 0)
            per_client = self.max_bytes_per_client or self.max_bytes
            for used, limit, name in ((owned, per_client, "max_store_bytes_per_client"),
                                      (self._bytes, self.max_bytes, "max_store_bytes")):
                if nbytes > limit:
                    raise LimitExceeded(
                        f"{nbytes:,} bytes to keep (counted with overheads), over the "
                        f"store's limit of {limit:,} ({name}, flag --{name.replace('_', '-')})",
                        field=field_name)
            self._expire()
            self._evict(lambda: self._by_owner.get(owner, 0) + nbytes > per_client,
                        owner, field_name)
            self._evict(lambda: self._bytes + nbytes > self.max_bytes, None, field_name)
            self._bytes += nbytes
            self._by_owner[owner] = self._by_owner.get(owner, 0) + nbytes

    def release(self, owner: str, nbytes: int) -> None:
        """Un-count bytes reserved for a put that failed (or a state that shrank)."""
        with self._lock:
            self._uncount(owner, nbytes)

    def _uncount(self, owner: str, nbytes: int) -> None:
        self._bytes -= nbytes
        left = self._by_owner.get(owner, 0) - nbytes
        if left > 0:
            self._by_owner[owner] = left
        else:
            self._by_owner.pop(owner, None)

    def _evict(self, over, owner: str | None, field_name: str) -> None:
        while over():
            victim = next((h for h, e in self._entries.items()
                           if owner is None or e.owner == owner), None)
            if victim is None:  # the rest is reserved by puts in progress
                raise LimitExceeded(
                    "the tensor store is full with puts in progress "
                    f"({self._bytes:,} of {self.max_bytes:,} bytes, max_store_bytes); "
                    "retry with backoff", field=field_name)
            self._drop(victim)

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            handle, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            self._drop(handle)

    def _drop(self, handle: str) -> None:
        entry = self._entries.pop(handle)
        self._uncount(entry.owner, entry.nbytes)

    # --- handles ------------------------------------------------------------------------

    def add(self, owner: str, tensors: dict, reserved: int) -> Entry:
        """Keep `tensors` (their bytes already reserved for `owner`) under a new handle."""
        handle = secrets.token_hex(16)
        with self._lock:
            self._expire()
            while self.max_handles and len(self._entries) >= self.max_handles:
                self._drop(next(iter(self._entries)))
            entry = Entry(handle, owner, tensors, reserved, self._clock() + self.seconds)
            self._entries[handle] = entry
        return entry

    def keep(self, owner: str, tensors: dict, field_name: str) -> str:
        """A new handle holding `tensors` (arrays made here, e.g. a request's results)."""
        nbytes = tensor_nbytes(tensors)
        self.reserve(owner, nbytes, field_name)
        return self.add(owner, tensors, nbytes).handle

    def entry(self, handle: str, field_name: str) -> Entry:
        """The entry of `handle`, now the most recently used; StoredNotFound if gone."""
        with self._lock:
            self._expire()
            entry = self._entries.get(handle)
            if entry is None:
                raise StoredNotFound(
                    f"stored tensors: handle '{handle[:64]}' is not held by this server "
                    f"process (unknown, evicted or expired: kept {self.seconds:g} s unused, "
                    f"{self.max_bytes:,} bytes and {self.max_handles:,} handles at most): "
                    "put the tensors again", field=field_name)
            entry.expires = self._clock() + self.seconds
            self._entries.move_to_end(handle)
            return entry

    def resize(self, entry: Entry, nbytes: int, field_name: str) -> None:
        """`entry` now holds `nbytes` (a training state that gained momentum buffers)."""
        grow = nbytes - entry.nbytes
        if grow > 0:
            self.reserve(entry.owner, grow, field_name)
        elif grow < 0:
            self.release(entry.owner, -grow)
        with self._lock:
            entry.nbytes = nbytes

    def delete(self, handle: str) -> bool:
        with self._lock:
            if handle not in self._entries:
                return False
            self._drop(handle)
            return True

    def tensors(self, refs, field_name: str, into: dict | None = None) -> dict:
        """The arrays a request's map<string, StoredTensor> names, by its keys, added to
        `into` (a request's inline map, copied: a key in both is INVALID_ARGUMENT)."""
        out = dict(into or {})
        entries = {}  # each handle looked up (and its expiry renewed) once a request
        for key, ref in refs.items():
            # (the field named only when it is blamed: ~1 us a tensor otherwise)
            if key in out:
                raise BadRequest(f"'{key}' is given both inline and stored",
                                 field=f"{field_name}['{key}']")
            handle = ref.handle
            entry = entries.get(handle)
            if entry is None:
                entry = entries[handle] = self.entry(handle, f"{field_name}['{key}']")
            name = ref.name or key
            array = entry.tensors.get(name)
            if array is None:
                raise BadRequest(f"handle holds no tensor '{name}' (it holds "
                                 f"{_names(entry.tensors)})", field=f"{field_name}['{key}']")
            out[key] = array
        return out

    # --- figures --------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._bytes

    def owner_bytes(self, owner: str) -> int:
        return self._by_owner.get(owner, 0)

    def __len__(self) -> int:
        return len(self._entries)


def _names(tensors: dict, most: int = 8) -> str:
    names = list(tensors)
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "") or "none"


@contextlib.contextmanager
def reply_limit_hint():
    """A reply refused as larger than the message limit: say so with the limit's flag
    and the way around it (the derivatives kept in the store, fetched in chunks)."""
    try:
        yield
    except ResourceLimitError as err:
        if "(max_reply_bytes)" not in str(err):
            raise
        raise LimitExceeded(
            f"{err} - the server's max_message_bytes (flag --max-message-bytes, "
            "GRADSERVE_MAX_MESSAGE_BYTES): keep the derivatives on the server with "
            "store_results and fetch them in chunks (GetTensors; Client.differentiate(..., "
            "store_results=True) and Client.get, which Client.differentiate does by "
            "itself when it sees large inputs), or send large inputs by Client.put",
            field=err.field) from None


class Upload:
    """One PutTensors call: chunks assembled into arrays (gradserve.v1.chunks), their
    bytes reserved in the store as each tensor begins, so that a put over a bound
    stops before its data arrives."""

    def __init__(self, store: TensorStore, owner: str, max_elements: int | None):
        self.store, self.owner = store, owner
        self.reserved = 0
        self.assembler = Assembler(self._reserve, max_elements)

    def _reserve(self, nbytes: int, field_name: str) -> None:
        cost = nbytes + STORE_BYTES_PER_TENSOR + (0 if self.reserved else STORE_BYTES_PER_HANDLE)
        self.store.reserve(self.owner, cost, field_name)
        self.reserved += cost

    def add(self, data: bytes) -> None:
        self.assembler.add(data)

    def finish(self) -> Entry:
        tensors = self.assembler.finish()
        self.assembler = None  # (it refers back to self: no cycle keeps the arrays)
        entry = self.store.add(self.owner, tensors, self.reserved)
        self.reserved = 0
        return entry

    def abort(self) -> None:
        self.assembler = None
        if self.reserved:
            self.store.release(self.owner, self.reserved)
            self.reserved = 0
