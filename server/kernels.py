"""The engine's kernel provider for this server process (gradserve.engine.kernels):
chosen once at start (`gradserve serve --kernels`) and compiled there, so that the first
request does not pay numba's compilation."""

from __future__ import annotations

import time

from gradserve.engine import kernels

CHOICES = kernels.CHOICES
ENV = kernels.ENV
KernelProviderError = kernels.KernelProviderError


def start_kernels(name: str) -> tuple[str, float]:
    """Select the provider ("auto", "numpy" or "numba") and compile its kernels; the
    active provider and the seconds it took. KernelProviderError (a ValueError) for an
    unknown name, or "numba" without numba."""
    began = time.monotonic()
    kernels.use(name)
    return kernels.warm_up(), time.monotonic() - began
