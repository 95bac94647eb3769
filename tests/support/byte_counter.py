"""A TCP proxy on loopback that counts the bytes going each way: what a client really
sends per call (HTTP/2 frames, gRPC messages and all), measured outside the client.

    with ByteCounter("127.0.0.1:50051") as proxy:
        client = Client(proxy.address)
        before = proxy.sent
        client.evaluate(...)
        proxy.sent - before          # bytes from the client to the server for that call
"""

from __future__ import annotations

import socket
import threading


class ByteCounter:
    """Forwards every connection to `target` ("HOST:PORT"); `sent` counts client -> server
    bytes, `received` server -> client, over all connections."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self.sent = self.received = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self._listener.accept()
            except OSError:  # closed
                return
            outbound = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [inbound, outbound]
            for src, dst, attr in ((inbound, outbound, "sent"), (outbound, inbound, "received")):
                threading.Thread(target=self._pump, args=(src, dst, attr), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, attr: str) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    setattr(self, attr, getattr(self, attr) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> "ByteCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
