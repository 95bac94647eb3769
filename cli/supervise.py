"""`gradserve serve --processes N`: N server processes on one port, and their supervisor.

One Python process computes on one core at a time (the GIL), so N processes serve
N cores. The parent reserves the port with SO_REUSEPORT (so --port 0 works: every
child binds the port the parent got; grpc sets SO_REUSEPORT itself on Linux), forks
N children that serve as `--processes 1` does, each with its own workers, graph
cache (graph ids are content hashes: a process that has not seen a graph answers
NOT_FOUND and the client resends it inline) and health, and then supervises them:

- "gradserve listening on HOST:PORT" is logged once, when every child is serving;
- SIGTERM or SIGINT goes to every child, each drains as one process does (health
  NOT_SERVING, --drain, calls in flight get --grace), and the parent exits 0 once
  all of them have exited 0;
- a child that exits on its own (a crash, the OOM killer) is not restarted: the
  others are stopped as on SIGTERM and the parent exits 1, so the orchestrator
  (Kubernetes, compose's restart policy) restarts the whole server and sees the
  failure, rather than a server running on fewer cores than it claims;
- children get SIGTERM if the parent dies (PR_SET_PDEATHSIG), so none is orphaned;
- /metrics: child I serves its own on --metrics-port + I (0: a free port each),
  every sample labelled process="I".

The kernel balances connections, not calls, over the processes: a client needs as
many connections as processes to use them all (Client(address, channels=N)).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time

from .serve import serve_one

log = logging.getLogger("gradserve.server")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to host:port with SO_REUSEPORT: it holds the port
    for the children, which bind it too."""
    name = host[1:-1] if host.startswith("[") else host
    family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise SystemExit(f"gradserve serve: cannot bind {host}:{port}: {err}") from None
    return sock


def supervise(args, token) -> int:
    """Serve with `args.processes` children on one port until SIGTERM or SIGINT; the
    exit code (see the module's docstring)."""
    with reserve_port(args.host, args.port) as reserved:
        port = reserved.getsockname()[1]
        stop = threading.Event()
        children, ready = _start(args, token, port, stop)
        if _wait_ready(children, ready, stop):
            log.warning("%d server processes, pids %s", len(children),
                        " ".join(str(c.pid) for c in children))
            log.warning("gradserve listening on %s:%d%s%s", args.host, port,
                        " (TLS)" if args.tls_cert else "",
                        " (token required)" if token else "")
            sentinels = [c.sentinel for c in children]
            while not stop.is_set() and all(c.exitcode is None for c in children):
                multiprocessing.connection.wait(sentinels, timeout=0.1)
        return _stop(children, stop.is_set(), args.grace + args.drain + 10.0)


def _start(args, token, port, stop):
    """Fork the children, signals blocked meanwhile (a child must not run the parent's
    handler, nor miss a SIGTERM before it has its own)."""
    context = multiprocessing.get_context("fork")  # nothing of grpc's runs yet here
    children, ready = [], []
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        for sig in SIGNALS:
            signal.signal(sig, lambda *_: stop.set())
        for index in range(args.processes):
            reader, writer = context.Pipe(duplex=False)
            child = context.Process(target=_child, name=f"gradserve-{index}",
                                    args=(args, token, port, index, writer, os.getpid(),
                                          blocked))
            child.start()
            writer.close()
            children.append(child)
            ready.append(reader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return children, ready


def _child(args, token, port, index, ready, parent, mask) -> None:
    stop = threading.Event()
    for sig in SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    try:  # die with the parent rather than serve on as an orphan
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if os.getppid() != parent:
        sys.exit(0)  # the parent died before PR_SET_PDEATHSIG took effect

    def serving() -> None:
        ready.send(os.getpid())
        ready.close()
    sys.exit(serve_one(args, token, port=port, stop=stop, process=index, ready=serving))


def _wait_ready(children, ready, stop) -> bool:
    """Wait until every child is serving: True; False if a signal or a child's exit
    came first."""
    waiting = set(ready)
    while waiting and not stop.is_set():
        for done in multiprocessing.connection.wait([*waiting, *(c.sentinel for c in children)],
                                                    timeout=0.1):
            if done in waiting:
                try:
                    done.recv()
                except EOFError:
                    pass  # the child exited: seen below
                waiting.discard(done)
        if any(c.exitcode is not None for c in children):
            return False
    return not waiting


def _stop(children, signalled: bool, timeout: float) -> int:
    """SIGTERM to every child still running, wait for them (SIGKILL after `timeout` s);
    0 if all exited 0 after a signal, else 1."""
    died = [] if signalled else [c for c in children if c.exitcode is not None]
    for child in died:
        log.error("server process %s (pid %d) exited with code %s: stopping the others",
                      child.name, child.pid, child.exitcode)
    for child in children:
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.exitcode is None:
            log.error("server process %s (pid %d) still running %gs after SIGTERM: killed",
                      child.name, child.pid, timeout)
            child.kill()
            child.join()
    return 0 if signalled and all(c.exitcode == 0 for c in children) else 1
