"""The engine's kernel provider for this server process (gradserve.engine.kernels),
from `gradserve serve --kernels`:

- `numba`: chosen at start, its kernels compiled (or loaded from numba's cache) in a
  background thread, so that the server listens at once and the first request finds
  them ready (or waits only for what is left of the compilation);
- `auto` (the default): nothing at start; the first depthwise convolution the process
  runs picks numba if it imports (and compiles or loads its kernels then, once), else
  numpy. A process that never sees one never imports numba: no start-up CPU, no
  memory, which matters with many processes or replicas;
- `numpy`: the built-in kernels."""

from __future__ import annotations

import logging
import threading
import time

from gradserve.engine import kernels

CHOICES = kernels.CHOICES
ENV = kernels.ENV
KernelProviderError = kernels.KernelProviderError

log = logging.getLogger("gradserve.server")


def check_kernels(name: str) -> str:
    """Check the choice without compiling anything (a supervisor checks it before it
    starts server processes): the provider it selects ("auto" stays undecided until
    the first depthwise convolution), or KernelProviderError."""
    if name == "auto":
        return name
    return kernels.use(name)


def start_kernels(name: str, announce: bool = True) -> str:
    """Select the provider ("numpy" or "numba") now and compile its kernels in a daemon
    thread (logged when done, with `announce`); returns the active provider ("auto":
    left to the first depthwise convolution, see above).
    KernelProviderError (a ValueError) for an unknown name, or "numba" without numba."""
    if name == "auto":
        if announce:
            log.warning("conv kernels: auto (numba if it imports, at the first depthwise "
                        "convolution; else numpy)")
        return name
    provider = kernels.use(name)
    if provider == "numpy":
        if announce:
            log.warning("conv kernels: numpy")
        return provider

    def warm():
        began = time.monotonic()
        try:
            kernels.warm_up()
        except Exception:  # noqa: BLE001 - requests compile on first use instead
            log.exception("conv kernels: compiling numba's kernels at start failed")
            return
        if announce:
            log.warning("conv kernels: %s, compiled or loaded in %.1f s", provider,
                        time.monotonic() - began)
    threading.Thread(target=warm, name="gradserve-kernels-warm-up", daemon=True).start()
    return provider
