"""The server that demo, train and graph start in-process when no --server is given."""

from __future__ import annotations

import contextlib

from gradserve.server.app import create_server


@contextlib.contextmanager
def server_address(address: str | None):
    """The given address, or an in-process server on a free loopback port, with one
    BLAS thread as `gradserve serve` has by default (two threads sharing 2 busy cores
    made `gradserve train`'s steps 2-5x slower than a server process's)."""
    if address:
        yield address
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"), create_server("127.0.0.1:0") as server:
        yield f"127.0.0.1:{server.port}"
