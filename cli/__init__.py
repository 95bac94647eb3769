"""gradserve.cli: the `gradserve` command (serve, demo, health, train, graph, umbridge).

The command parses arguments, prints and exits; the libraries it drives
(gradserve.server, gradserve.client) do none of those.
"""

import os

# Before anything imports NumPy: OpenBLAS's idle helper threads then sleep as soon as a
# product ends, rather than spin ~0.1 s holding a core. `gradserve serve` widens a large
# request's products only when this holds (server/blas.py).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .main import build_parser, main  # noqa: E402  (after the variable: imports NumPy)

__all__ = ["build_parser", "main"]
