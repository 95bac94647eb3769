"""Shared helpers for the gradserve benchmarks: timing, tables, ratio lines, environment.

Import this module before numpy/torch in a benchmark script: it sets
OMP_WAIT_POLICY=PASSIVE first, because torch's idle OpenMP threads otherwise
spin and slow numpy's BLAS several times over (see /work/shared/PERF-NOTES.md).

Timing: every figure is the median of >= 7 repeats; each repeat runs the
function `number` times back to back, `number` chosen (timeit-autorange
style) so that one repeat takes about `target` seconds. When several
functions are compared, their repeats are interleaved round by round, so a
slow spell on the shared machine spoils a few rounds of each of them rather
than every round of one. (Multi-threaded BLAS suffers most when other
processes compete for the 2 CPUs: a matrix product waits for its descheduled
worker thread. The run's load average is printed at the end for that reason.)
Benchmarks print figures and ratios; they never assert on time.
"""

from __future__ import annotations

import os

# Must happen before torch (and its OpenMP runtime) is loaded anywhere in the
# process: libgomp reads it once, when it is loaded.
_OMP_POLICY_BEFORE = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import timeit  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Mapping  # noqa: E402

import numpy as np  # noqa: E402

TORCH_INSTALL_HINT = "pip install -e '.[bench]'"


# --- settings and arguments ----------------------------------------------------

@dataclass(frozen=True)
class Settings:
    repeat: int  # repeats per measurement; the median is reported (>= 7)
    target: float  # seconds one repeat should last (sets `number`)
    quick: bool = False


# Many short repeats rather than a few long ones: a slow spell on the shared
# machine then spoils a few rounds of every function compared, not the median.
FULL = Settings(repeat=21, target=0.08)
QUICK = Settings(repeat=9, target=0.015, quick=True)


def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    """--quick and --json PATH, shared by every benchmark script; `extra(parser)`
    adds a script's own options."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("--quick", action="store_true",
                        help="fewer and shorter repeats (and, for some scripts, fewer cases)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every figure measured to this JSON file")
    args = parser.parse_args(argv)
    args.settings = QUICK if args.quick else FULL
    return args


# --- timing ----------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds per call: median (the reported figure), min and max over the repeats."""

    name: str
    median: float
    min: float
    max: float
    number: int  # calls per repeat
    repeat: int
    times: list = field(default_factory=list, repr=False)  # seconds per call, per repeat

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy the repeats were."""
        if len(self.times) < 4:
            return 0.0
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / self.median

    def as_dict(self) -> dict:
        d = asdict(self)
        d["times"] = [float(t) for t in self.times]
        d["spread"] = self.spread
        return d


def _calibrate(timer: timeit.Timer, target: float) -> int:
    """Calls per repeat so that a repeat lasts about `target` seconds."""
    number = 1
    while True:
        t = timer.timeit(number)
        if t >= target / 10 or number >= 10 ** 7:
            break
        number *= 10
    if number == 1 and t >= 2 * target:
        return 1  # one call is already long enough: no need to look further
    # The best of five: a slow spell of the shared machine must not set `number`.
    t = min([t] + [timer.timeit(number) for _ in range(4)])
    per_call = max(t / number, 1e-9)
    return max(1, math.ceil(target / per_call))


def measure(funcs: Mapping[str, Callable], settings: Settings) -> dict[str, Timing]:
    """Time each function (median of settings.repeat repeats), repeats interleaved."""
    timers, numbers = {}, {}
    for name, f in funcs.items():
        f()  # warm-up: caches, lazy imports, first-touch allocations
        timers[name] = timeit.Timer(f)
        numbers[name] = _calibrate(timers[name], settings.target)
    samples = {name: [] for name in funcs}
    for _ in range(settings.repeat):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]) / numbers[name])
    return {name: Timing(name, statistics.median(ts), min(ts), max(ts), numbers[name],
                         settings.repeat, ts)
            for name, ts in samples.items()}


# --- printing ----------------------------------------------------------------------

def fmt_time(seconds: float | None) -> str:
    """A duration with a unit a person reads at a glance: 850 ns, 11.8 us, 1.25 ms, 2.3 s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 0:  # e.g. a fitted slope lost in the noise
        return "-" + fmt_time(-seconds)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            v = seconds / scale
            break
    else:
        unit, v = "ns", seconds / 1e-9
    if v >= 100:
        return f"{v:,.0f} {unit}"
    return f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"


def print_table(headers, rows, title: str | None = None, file=None) -> None:
    """A plain aligned text table: first column left-aligned, the others right-aligned."""
    file = file or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    if title:
        print(title, file=file)
    print(line(cells[0]), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells[1:]:
        print(line(r), file=file)
    print(file=file)


def ratio_line(name: str, value: float, baseline: float | None, target: float,
               better: str = "lower", *, baseline_name: str = "torch",
               fmt: Callable[[float], str] = fmt_time, skipped: str | None = None,
               note: str | None = None, echo: bool = True, file=None) -> dict:
    """Print e.g. "P1 seed gradient: 11.8 us vs torch 59.3 us = 0.20x (target <= 0.40x) MET".

    `better="lower"` means the target is met when value / baseline <= target,
    `"higher"` when it is >= target. A missing baseline prints the line as
    skipped (with `skipped` as the reason); `note` is appended in brackets
    (see noise_note). Returns the figures as a dict (`echo=False`: only that,
    nothing printed).
    """
    if better not in ("lower", "higher"):
        raise ValueError("better must be 'lower' or 'higher'")
    op = "<=" if better == "lower" else ">="
    record = {"name": name, "value": value, "baseline": baseline,
              "baseline_name": baseline_name, "target": target, "better": better,
              "note": note}
    tail = f" [{note}]" if note else ""
    if baseline is None:
        reason = skipped or f"{baseline_name} baseline not measured"
        if echo:
            print(f"{name}: {fmt(value)} vs {baseline_name} - (target {op} {target:.2f}x) "
                  f"SKIPPED ({reason})", file=file or sys.stdout)
        record.update(ratio=None, met=None)
        return record
    ratio = value / baseline
    met = ratio <= target if better == "lower" else ratio >= target
    # Three decimals where two would show the target itself on the wrong side of it.
    shown = f"{ratio:.2f}" if f"{ratio:.2f}" != f"{target:.2f}" else f"{ratio:.3f}"
    if echo:
        print(f"{name}: {fmt(value)} vs {baseline_name} {fmt(baseline)} = {shown}x "
              f"(target {op} {target:.2f}x) {'MET' if met else 'NOT MET'}{tail}",
              file=file or sys.stdout)
    record.update(ratio=ratio, met=bool(met))
    return record


def noise_note(value: Timing, baseline: Timing | None, threshold: float = 0.5) -> str | None:
    """A warning for a ratio line when either figure's repeats were noisy
    (interquartile range over median above `threshold`), with the ratio of the
    minimums beside it: under CPU contention the minimum is the better guide."""
    if baseline is None:
        return None
    spread = max(value.spread, baseline.spread)
    if spread <= threshold:
        return None
    return (f"noisy: spread {100 * value.spread:.0f}% / {100 * baseline.spread:.0f}%, "
            f"ratio of the minimums {value.min / baseline.min:.2f}x; re-run on a quiet machine")


# --- optional torch --------------------------------------------------------------------

_torch = None
_torch_error = None


def load_torch():
    """The torch module, or None (with the reason in torch_skip_message()) if absent."""
    global _torch, _torch_error
    if _torch is None and _torch_error is None:
        try:
            import torch
        except Exception as e:  # ImportError, or a broken install
            _torch_error = f"{type(e).__name__}: {e}"
        else:
            _torch = torch
    return _torch


def torch_skip_message() -> str:
    return (f"torch is not importable ({_torch_error}); the PyTorch baselines were skipped. "
            f"Install them with: {TORCH_INSTALL_HINT}")


# --- environment -------------------------------------------------------------------------

def _openblas_from_process() -> list[str]:
    """Ask the OpenBLAS numpy has loaded for its run-time kernel (as threadpoolctl does)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps
                     if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    except OSError:
        return []
    lines = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        found = {}
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_"):
                for what in ("get_corename", "get_config", "get_num_threads"):
                    fn = getattr(lib, f"{prefix}openblas_{what}{suffix}", None)
                    if fn is None or what in found:
                        continue
                    fn.restype = ctypes.c_int if what == "get_num_threads" else ctypes.c_char_p
                    value = fn()
                    found[what] = value.decode() if isinstance(value, bytes) else value
        if found:
            lines.append(f"OpenBLAS kernel in use: {found.get('get_corename', '?')}, "
                         f"{found.get('get_num_threads', '?')} threads "
                         f"({found.get('get_config', '?').strip()}) [{os.path.basename(path)}]")
    return lines


def blas_info() -> list[str]:
    """One line per BLAS library in use: threadpoolctl if installed, else OpenBLAS
    asked directly, else numpy's build configuration (not necessarily the kernel
    chosen at run time)."""
    np.dot(np.ones((8, 8)), np.ones((8, 8)))  # make sure the BLAS is loaded
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        lines = [f"{i.get('internal_api')} {i.get('version')}: kernel "
                 f"{i.get('architecture', '?')}, {i.get('num_threads')} threads "
                 f"[{os.path.basename(i.get('filepath', ''))}] (threadpoolctl)"
                 for i in threadpool_info() if i.get("user_api") == "blas"]
        if lines:
            return lines
    lines = _openblas_from_process()
    if lines:
        return [line + " (threadpoolctl not installed; asked OpenBLAS directly)"
                for line in lines]
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return [f"numpy BLAS (build configuration, not necessarily the run-time kernel): "
                f"{blas.get('name')} {blas.get('version')}; "
                f"{blas.get('openblas configuration', '')}"]
    except Exception as e:  # show_config's layout is not a stable API
        return [f"numpy BLAS: unknown ({e})"]


def environment_lines(with_torch: bool = True) -> list[str]:
    """Versions, BLAS kernel and the environment variables that change the figures."""
    lines = [f"Python {platform.python_version()}, numpy {np.__version__}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs"]
    torch = load_torch() if with_torch else None
    if torch is not None:
        lines.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    lines += blas_info()
    core = os.environ.get("OPENBLAS_CORETYPE")
    l2 = os.environ.get("OPENBLAS_L2_SIZE")
    lines.append(
        f"OPENBLAS_CORETYPE={core if core is not None else '(unset)'}, "
        f"OPENBLAS_L2_SIZE={l2 if l2 is not None else '(unset)'}. The project's machines set "
        "OPENBLAS_CORETYPE=Haswell and OPENBLAS_L2_SIZE (older OpenBLAS builds misbehave "
        "without them); Haswell is a slower kernel than the one OpenBLAS picks by itself on "
        "AVX-512 CPUs, so BLAS-bound figures (P3, large P4) depend on it. Do not change them "
        "in tests or CI.")
    policy = os.environ.get("OMP_WAIT_POLICY")
    note = "set by bench/_timing.py" if _OMP_POLICY_BEFORE is None else "from the environment"
    warn = "" if policy.upper() == "PASSIVE" else \
        " WARNING: not PASSIVE; torch's spinning threads will slow numpy's BLAS"
    lines.append(f"OMP_WAIT_POLICY={policy} ({note}){warn}")
    return lines


def print_environment(with_torch: bool = True) -> list[str]:
    lines = environment_lines(with_torch)
    for line in lines:
        print(line)
    print()
    return lines


class RunClock:
    """Wall time and load average over a run. The benchmark itself accounts for
    about 1 of the 1-minute load average; above the CPU count, other processes
    competed for the CPUs while it ran."""

    def __init__(self):
        self.start = timeit.default_timer()
        self.load_start = _loadavg()

    def summary(self) -> dict:
        return {"wall_seconds": timeit.default_timer() - self.start,
                "load_average_start": self.load_start, "load_average_end": _loadavg(),
                "cpus": os.cpu_count()}

    def print_summary(self) -> dict:
        s = self.summary()
        busy = max(s["load_average_start"] or 0, s["load_average_end"] or 0)
        note = (" - other processes were competing for the CPUs: expect noisy figures; "
                "ratios suffer less than absolute times but are not immune, so re-run on a "
                "quiet machine before drawing conclusions"
                if busy > (s["cpus"] or 1) else "")
        print(f"ran {s['wall_seconds']:.0f} s; 1-minute load average "
              f"{s['load_average_start']} at the start, {s['load_average_end']} at the end, "
              f"{s['cpus']} CPUs{note}")
        return s


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_json(path: str, payload: dict) -> None:
    def default(o):
        if isinstance(o, Timing):
            return o.as_dict()
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=default)
        f.write("\n")
    print(f"wrote {path}")
