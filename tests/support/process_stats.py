"""What a server process uses, read from /proc: resident memory (now and at its peak)
and CPU time. The tests that bound a request's memory or work measure the server with
these, not only the status code (bench/ imports them too)."""

from __future__ import annotations

import os


def status_mib(pid: int, key: str = "VmRSS") -> float:
    """A /proc/PID/status figure in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(key)


def reset_peak_rss(pid: int) -> None:
    """VmHWM := VmRSS, so the next peak is this process's from now on; skips the test
    where the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        import pytest
        pytest.skip("cannot reset the peak RSS here")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
