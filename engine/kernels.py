"""The seam between the conv op row and its kernel provider.

The numpy kernels (engine/depthwise.py, engine/windows.py) are the embedded default.
With the optional `numba` extra installed (`pip install 'gradserve[numba]'`), the
depthwise convolution's values and both transposes run as compiled loops instead
(engine/depthwise_numba.py); the dense convolutions stay numpy's gathers and BLAS (no
compiled gather was built: for ResNet's 3x3 64-channel layer the BLAS product alone
measured longer than PyTorch's whole convolution, the gather about a fifth of the
time). The provider is chosen once per process:

- `GRADSERVE_KERNELS` = `numpy` (the default), `auto` (numba when it imports, else
  numpy) or `numba` (an error when numba does not import), read at the first conv;
- or `use(name)` (`gradserve serve --kernels {auto,numpy,numba}`), before requests run.

numba is imported only here, and only when the provider is not `numpy`. Each provider
module has the same functions (conv, input_grad, weight_grad) and declares its own
cost (`cost(mode, ...)`, proven by tests/engine/test_costs.py), so the op row's
declared costs follow the provider that runs.
"""

from __future__ import annotations

import os
import threading

from . import depthwise as _numpy_depthwise

CHOICES = ("auto", "numpy", "numba")
ENV = "GRADSERVE_KERNELS"

_lock = threading.Lock()
_active: dict = {}  # "name" -> the active provider's name, "depthwise" -> its module


class KernelProviderError(ValueError):
    """An unknown provider name, or numba asked for and not importable."""


def _numba_depthwise():
    """engine/depthwise_numba.py, or the reason it cannot load (numba absent or broken)."""
    try:
        from . import depthwise_numba
    except Exception as e:  # noqa: BLE001 - ImportError, or a numba/llvmlite that fails to load
        return None, f"{type(e).__name__}: {e}"
    return depthwise_numba, None


def use(name: str) -> str:
    """Select the kernel provider ("auto", "numpy" or "numba"); returns the active one.
    "numba" raises KernelProviderError when numba does not import; "auto" falls back to
    numpy then."""
    if name not in CHOICES:
        raise KernelProviderError(f"kernel provider {name!r}: expected one of "
                                  f"{', '.join(CHOICES)}")
    with _lock:
        if name == "numpy":
            module = _numpy_depthwise
        else:
            module, why = _numba_depthwise()
            if module is None:
                if name == "numba":
                    raise KernelProviderError(
                        f"kernel provider 'numba' asked for, but numba does not import "
                        f"({why}): install gradserve[numba] or use 'numpy'")
                module = _numpy_depthwise
        _active["depthwise"] = module
        _active["name"] = "numpy" if module is _numpy_depthwise else "numba"
        return _active["name"]


def _resolve():
    if "name" not in _active:
        use(os.environ.get(ENV, "numpy").strip().lower() or "numpy")


def active() -> str:
    """The active provider's name: "numpy" or "numba"."""
    _resolve()
    return _active["name"]


def depthwise():
    """The depthwise kernels' module (conv, input_grad, weight_grad, cost)."""
    module = _active.get("depthwise")
    if module is None:
        _resolve()
        module = _active["depthwise"]
    return module


def warm_up() -> str:
    """Compile the active provider's kernels now (numba: from its on-disk cache when
    there is one), so that the first request does not pay for it; returns the
    provider's name."""
    module = depthwise()
    if hasattr(module, "warm_up"):
        module.warm_up()
    return active()
