"""gradserve.cli: the `gradserve` command (serve, demo, health, train, graph, umbridge).

The command parses arguments, prints and exits; the libraries it drives
(gradserve.server, gradserve.client) do none of those.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
