"""The engine's kernel provider for this server process (gradserve.engine.kernels),
from `gradserve serve --kernels`:

- `numpy` (the default): the built-in kernels; numba is never imported;
- `numba`, or `auto` when numba imports: chosen at start, its kernels compiled (or
  loaded from numba's cache) in a background thread, so that the server listens at
  once and the first request finds them ready (or waits only for what is left of the
  compilation). numba's own memory and the compilation's CPU are the process's, at
  start, not any request's."""

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
    """Select the provider without compiling anything (a supervisor checks the choice
    before it starts server processes); the active provider, or KernelProviderError."""
    return kernels.use(name)


def start_kernels(name: str, announce: bool = True) -> str:
    """Select the provider ("auto", "numpy" or "numba") now and compile its kernels in a
    daemon thread (logged when done, with `announce`); returns the active provider.
    KernelProviderError (a ValueError) for an unknown name, or "numba" without numba."""
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
