"""The server that demo, train and graph start in-process when no --server is given."""

from __future__ import annotations

import contextlib

from gradserve.server.app import create_server


@contextlib.contextmanager
def server_address(address: str | None):
    """The given address, or an in-process server on a free loopback port."""
    if address:
        yield address
        return
    with create_server("127.0.0.1:0") as server:
        yield f"127.0.0.1:{server.port}"
