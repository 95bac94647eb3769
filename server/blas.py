"""How many threads a request's BLAS products run: one while requests share the server,
all of the CPUs for a large request alone on CPUs that are not contended.

`gradserve serve` runs BLAS at one thread (--blas-threads): requests already run in
parallel on the worker threads, and on a busy machine a product split over threads
waits for descheduled helpers (a 64-wide MLP step at batch 64 took 0.9-1.4 ms at two
threads against 0.33-0.35 at one). But a single large request then runs at one CPU
of several: a 25.5M-parameter MLP's gradient took 91-94 ms at one thread and 53-57 ms
at two, where PyTorch takes 60-65 ms.

So a request's products run at `alone` threads (--blas-threads-alone) when all of
these hold as its work starts (`BlasWidth.run`):
- its estimated work is at least `min_flops` (MIN_FLOPS: ~20 ms of one thread's
  products here; the estimate is the plan's declared FLOPs of one sweep and one
  direction, a lower bound of any derivative's work);
- it is the only request in progress in this server (admitted and not answered);
- the CPUs are not contended: lately (`CpuPressure`: over the last 0.5-10 s, else the
  last 10 s), tasks of this cgroup (a container's) or else of the machine waited for a
  CPU at most `max_pressure` percent of the time (Linux's pressure stall information,
  PSI; --blas-alone-max-pressure). A quiet 2-CPU machine reads 1-5%; without PSI this
  is taken to hold. A machine whose other processes keep its CPUs busy without
  contending reads low too: the wide request's helpers then contend, the pressure
  rises, and later requests run at `threads`. (With two busy-looping processes on 2
  CPUs, a NumPy replay of that gradient's products took 148-247 ms at two threads
  against 137-153 ms at one.)
A request admitted meanwhile narrows BLAS back to `threads` at once (`narrow`, from
Calls.admit): the large request's next products run at one thread, and the new one's
never run wide. OpenBLAS has one thread count for the process, so only one request
at a time is wide, and the count is set back when it ends.

Widening needs OpenBLAS's idle helper threads to sleep at once: by default they spin
~0.1 s after each product (2^28 cycles), a core held from every other process. The
`gradserve` command sets OPENBLAS_THREAD_TIMEOUT (cli/__init__.py) before NumPy loads
its BLAS; a server whose process did not (create_server in a program of one's own,
where NumPy came first) has `alone` off unless the variable is set.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter as Metric

log = logging.getLogger("gradserve.server")

MIN_FLOPS = 1_000_000_000  # ~20 ms of one BLAS thread's float32 products here
MAX_PRESSURE = 10.0  # percent of the last 10 s some task waited for a CPU
SPIN_VARIABLE = "OPENBLAS_THREAD_TIMEOUT"  # (cli/__init__.py sets 4: 2^4 cycles)


def numpy_blas():
    """threadpoolctl's controllers of NumPy's own BLAS (of every BLAS library loaded when
    none is NumPy's own: another package's, e.g. SciPy's, is not the engine's); [] if
    threadpoolctl cannot tell."""
    try:
        from threadpoolctl import ThreadpoolController
        pools = [lib for lib in ThreadpoolController().lib_controllers
                 if lib.user_api == "blas"]
    except Exception:  # noqa: BLE001 - unknown: nothing to control
        return []
    root = os.path.dirname(np.__file__)  # (a wheel's own BLAS is under numpy.libs beside it)
    return [lib for lib in pools if str(lib.filepath).startswith(root)] or pools


def setters() -> list:
    """Functions setting the thread count of NumPy's OpenBLAS from any thread, [] if it
    has none. (Its openblas_set_num_threads, which threadpoolctl calls, is ignored when
    called from a thread other than the main one, as a worker's would be, in OpenBLAS
    0.3.31; openblas_set_num_threads_local, despite its name, sets the library's count
    from any thread.)"""
    found = []
    for lib in numpy_blas():
        if lib.internal_api != "openblas":
            return []
        try:
            set_threads = ctypes.CDLL(lib.filepath).openblas_set_num_threads_local
        except (OSError, AttributeError):
            return []
        set_threads.argtypes, set_threads.restype = [ctypes.c_int], ctypes.c_int
        found.append(set_threads)
    return found


def blas_threads() -> int | None:
    """The threads NumPy's BLAS runs now, None if not known."""
    counts = [lib.num_threads for lib in numpy_blas()]
    return max(counts) if counts else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), fewer under a cgroup v2 CPU
    limit (a container's --cpus, a pod's limits.cpu), rounded up."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def read_psi() -> tuple[float, int] | None:
    """(the "some avg10" percentage, the "some total" microseconds) of this cgroup's CPU
    pressure (a container's) or else the machine's (Linux's pressure stall information:
    time in which some task waited for a CPU), None if not known (no PSI: before Linux
    4.20, or off)."""
    for path in ("/sys/fs/cgroup/cpu.pressure", "/proc/pressure/cpu"):
        try:
            with open(path, "rb") as f:
                some = dict(field.split(b"=") for field in f.readline().split()[1:])
            return float(some[b"avg10"]), int(some[b"total"])
        except OSError:
            continue
        except (KeyError, ValueError):
            return None
    return None


class CpuPressure:
    """The recent CPU pressure, in percent: over the time since the newest of its own
    readings at least WINDOW[0] s old (at most WINDOW[1] s), from the stall counter's
    microseconds; else (no such reading: the first request, or one after a quiet spell)
    Linux's own 10-s average, which it updates every 2 s. So contention that ended a
    moment ago does not keep a request narrow for 10-20 s, nor does new contention
    wait 2 s to show. Calling it returns None where PSI is not known."""

    WINDOW = (0.5, 10.0)

    def __init__(self, read=read_psi, clock=time.monotonic):
        self._read, self._clock = read, clock
        self._readings: deque = deque(maxlen=64)  # (time, total), oldest first
        self._lock = threading.Lock()

    def __call__(self) -> float | None:
        found = self._read()
        if found is None:
            return None
        avg10, total = found
        now = self._clock()
        shortest, longest = self.WINDOW
        with self._lock:
            readings = self._readings
            while readings and now - readings[0][0] > longest:
                readings.popleft()
            then = next(((t, n) for t, n in reversed(readings) if now - t >= shortest), None)
            if not readings or now - readings[-1][0] >= shortest / 4:
                readings.append((now, total))
        if then is None:
            return avg10
        return min(100.0, max(0.0, (total - then[1]) / ((now - then[0]) * 1e4)))


@dataclass(frozen=True)
class BlasPolicy:
    """What create_server is told of BLAS widths: `alone` the threads of a large request
    alone on the server (None: the CPUs this process may use; 0 or 1: never wider than
    the process's BLAS count), `min_flops` its least estimated work and `max_pressure`
    the most CPU pressure (percent; 100: not read) at which it widens."""

    alone: int | None = None
    min_flops: int = MIN_FLOPS
    max_pressure: float = MAX_PRESSURE


class BlasWidth:
    """The BLAS thread count of the request running now (see the module's docstring).
    `alone` 0 (or at most `threads`) never widens, nor more than `cpus`, the CPUs this
    process may use.
    `max_pressure` (percent, 100: pressure is not read) the most CPU pressure at which a
    request widens. `counts` says how many requests ran wide ("wide"), how many of
    those were narrowed by a request admitted meanwhile ("narrowed") and how many would
    have run wide but for the pressure ("contended"), also as the
    gradserve_blas_wide_requests metric."""

    def __init__(self, threads: int, alone: int, cpus: int, min_flops: int = MIN_FLOPS,
                 max_pressure: float = MAX_PRESSURE, registry=None, pressure=None):
        self.threads = max(1, threads)
        self.min_flops = min_flops
        self.max_pressure = max_pressure
        self._setters = setters()
        spin_short = bool(os.environ.get(SPIN_VARIABLE))
        self.alone = min(alone, cpus) if self._setters and spin_short else 0
        if alone > self.threads and not self.alone:
            log.info("BLAS stays at %d thread(s) for every request: %s", self.threads,
                     "NumPy's BLAS is not an OpenBLAS with openblas_set_num_threads_local "
                     "(0.3.26 or later)" if not self._setters else
                     f"{SPIN_VARIABLE} was not set before NumPy loaded OpenBLAS, whose idle "
                     "threads would spin after each product")
        if self.alone <= self.threads:
            self.alone = 0
        self._pressure = pressure or CpuPressure()
        self._lock = threading.Lock()
        self._wide = False
        self.counts = {"wide": 0, "narrowed": 0, "contended": 0}
        self._metric = Metric("gradserve_blas_wide_requests",
                              "large requests alone on the server: run at "
                              "--blas-threads-alone threads (wide), and of those, narrowed "
                              "back to --blas-threads by a request admitted meanwhile "
                              "(narrowed); or kept at --blas-threads because the CPUs were "
                              "contended (contended)", ["event"], registry=registry) \
            if registry is not None else None

    def width(self, in_progress: int, flops) -> int:
        """The threads a request may run at now: `in_progress` requests admitted (it
        among them); `flops()` its estimated work, asked for only when it would count."""
        if not self.alone or in_progress > 1:
            return self.threads
        try:
            if flops() < self.min_flops:
                return self.threads
        except Exception:  # noqa: BLE001 - a bad request: the engine raises its error next
            return self.threads
        pressure = self._pressure() if self.max_pressure < 100 else None
        if pressure is not None and pressure > self.max_pressure:
            self._count("contended")
            return self.threads
        return self.alone

    @contextmanager
    def run(self, in_progress, flops):
        """Run the block (one request's engine work) at the width it may have now;
        `in_progress()` the requests admitted, it among them."""
        threads = self.width(in_progress(), flops)
        if threads <= self.threads:
            yield
            return
        with self._lock:
            self._set(threads)
            self._wide = True
        self._count("wide")
        if in_progress() > 1:  # admitted meanwhile, before it could see the request wide
            self.narrow()
        try:
            yield
        finally:
            with self._lock:
                if self._wide:
                    self._set(self.threads)
                    self._wide = False

    def narrow(self) -> None:
        """Another request was admitted: BLAS back to `threads`, if a request runs wide."""
        if not self._wide:
            return
        with self._lock:
            if not self._wide:
                return
            self._set(self.threads)
            self._wide = False
        self._count("narrowed")

    def _set(self, threads: int) -> None:
        for set_threads in self._setters:
            set_threads(threads)

    def _count(self, event: str) -> None:
        self.counts[event] += 1
        if self._metric is not None:
            self._metric.labels(event).inc()
