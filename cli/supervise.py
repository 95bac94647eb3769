"""`gradserve serve --processes N`: N server processes on one port, and their supervisor.

One Python process computes on one core at a time (the GIL), so N processes serve
N cores. The parent checks that the port is free, then reserves it with
SO_REUSEPORT (so --port 0 works: every child binds the port the parent got; only
these children set SO_REUSEPORT, so no other server can join the port), forks N
children that serve as `--processes 1` does, each with its own workers, graph cache
(graph ids are content hashes: a process that has not seen a graph answers
NOT_FOUND and the client resends it inline) and health, and then supervises them,
as gunicorn and uvicorn do:

- "gradserve listening on HOST:PORT" is logged once, when every child is serving;
- a child that exits on its own (a crash, the OOM killer) is restarted after a
  backoff (RESTART_BACKOFF_SECONDS, doubling up to RESTART_BACKOFF_MAX) while the
  others keep serving; restarts are counted (gradserve_process_restarts_total). A
  child that dies before serving STABLE_SECONDS is a failed restart: after
  MAX_FAILED_RESTARTS of them in a row the others are stopped and the parent exits
  1, so the orchestrator sees a server that cannot run. A child failing before the
  first "listening" (a bad flag, TLS files) stops them all at once, exit 1;
- SIGTERM or SIGINT goes to every child, each drains as one process does (health
  NOT_SERVING, --drain, calls in flight get --grace), and the parent exits 0 once
  all of them have exited 0;
- children get SIGTERM if the parent dies (PR_SET_PDEATHSIG), so none is orphaned;
- /metrics: the parent serves one, on --metrics-port, merging its children's (each
  serves its own on a loopback port it reports when ready; every sample labelled
  process="I"), so one scrape sees every call.

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
import time
import urllib.request

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gradserve.server.telemetry import MetricsHTTPServer, merge_metrics

from .serve import StopRequest, serve_one

log = logging.getLogger("gradserve.server")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_SECONDS = 0.5  # after a child's death, before its first restart
RESTART_BACKOFF_MAX = 15.0  # the backoff doubles per failed restart, up to this
STABLE_SECONDS = 30.0  # a child serving this long was restarted successfully
MAX_FAILED_RESTARTS = 5  # failed restarts of one child in a row, then the server exits 1
SCRAPE_TIMEOUT_SECONDS = 2.0  # for a child's /metrics, when /metrics is scraped


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to host:port with SO_REUSEPORT: it holds the port
    for the children, which bind it too. The port is first bound without SO_REUSEPORT,
    which fails if anything holds it: a second server never joins a port in use."""
    name = host[1:-1] if host.startswith("[") else host
    family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
            address = (address[0], probe.getsockname()[1], *address[2:])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise SystemExit(f"gradserve serve: cannot bind {host}:{port}: {err}") from None
    return sock


class _Child:
    """One of the N server processes, across its restarts."""

    def __init__(self, index: int):
        self.index = index
        self.process = None  # multiprocessing.Process, or None while waiting to restart
        self.ready = None  # the pipe the process says it serves on
        self.serving_since: float | None = None
        self.metrics_port: int | None = None
        self.restarts = 0
        self.failures = 0  # failed restarts in a row
        self.restart_at: float | None = None

    @property
    def name(self) -> str:
        return f"gradserve-{self.index}"


class _Supervisor:
    def __init__(self, args, token, port: int):
        self.args, self.token, self.port = args, token, port
        self.stop = StopRequest()  # read by the loop below, set by signals only
        self.children = [_Child(i) for i in range(args.processes)]
        self.context = multiprocessing.get_context("fork")  # nothing of grpc's runs here
        self._mask = None

    # --- starting children ----------------------------------------------------------------

    def install_signals(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self.stop.set)

    def spawn(self, child: _Child) -> None:
        """Fork `child`'s process, signals blocked meanwhile (it must not run the
        parent's handler, nor miss a SIGTERM before it has its own)."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            reader, writer = self.context.Pipe(duplex=False)
            process = self.context.Process(
                target=_child_main, name=child.name,
                args=(self.args, self.token, self.port, child.index, writer, os.getpid(),
                      blocked))
            process.start()
            writer.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.process, child.ready, child.serving_since = process, reader, None
        child.restart_at = None

    def _on_ready(self, child: _Child) -> bool:
        """Read what `child` sent once serving: True if it serves."""
        try:
            child.metrics_port = child.ready.recv()
        except (EOFError, OSError):
            child.ready.close()
            child.ready = None
            return False  # it exited: seen by its sentinel
        child.ready.close()
        child.ready = None
        child.serving_since = time.monotonic()
        return True

    def wait_ready(self) -> bool:
        """Wait until every child serves: True; False if a signal or a child's exit came
        first."""
        while not self.stop.is_set():
            waiting = [c for c in self.children if c.ready is not None]
            if not waiting:
                return True
            handles = [c.ready for c in waiting] + [c.process.sentinel for c in self.children]
            for done in multiprocessing.connection.wait(handles, timeout=0.1):
                for child in waiting:
                    if done is child.ready:
                        self._on_ready(child)
            if any(c.process.exitcode is not None for c in self.children):
                return False
        return False

    # --- supervising -----------------------------------------------------------------------

    def run(self) -> int:
        """Restart children that die until a signal (exit code of the stop), or until
        restarts keep failing (1)."""
        while not self.stop.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.ready is not None and child.ready.poll():
                    if self._on_ready(child) and child.restarts:
                        log.warning("server process %s restarted (pid %d, restart %d)",
                                    child.name, child.process.pid, child.restarts)
                if child.process is not None and child.process.exitcode is not None:
                    if not self._died(child, now):
                        return self.shutdown(signalled=False)
                if child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    self.spawn(child)
            handles = [c.process.sentinel for c in self.children if c.process is not None]
            handles += [c.ready for c in self.children if c.ready is not None]
            waits = [c.restart_at - now for c in self.children if c.restart_at is not None]
            multiprocessing.connection.wait(handles, timeout=max(0.0, min([0.5, *waits])))
        return self.shutdown(signalled=True)

    def _died(self, child: _Child, now: float) -> bool:
        """Schedule the restart of `child`, whose process exited; False when its restarts
        keep failing."""
        process = child.process
        process.join()
        stable = child.serving_since is not None and now - child.serving_since >= STABLE_SECONDS
        child.failures = 0 if stable else child.failures + 1
        if child.ready is not None:
            child.ready.close()
            child.ready = None
        child.process, child.serving_since, child.metrics_port = None, None, None
        if child.failures >= MAX_FAILED_RESTARTS:
            log.error("server process %s (pid %d) exited with code %s, its %d restarts in a "
                      "row failed (each died within %gs): stopping the others",
                      child.name, process.pid, process.exitcode, child.failures,
                      STABLE_SECONDS)
            return False
        backoff = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_SECONDS * 2 ** max(0, child.failures - 1))
        child.restart_at = now + backoff
        log.error("server process %s (pid %d) exited with code %s: restarting it in %gs; "
                  "the others serve meanwhile", child.name, process.pid, process.exitcode,
                  backoff)
        return True

    def shutdown(self, signalled: bool) -> int:
        """SIGTERM to every child still running, wait for them (SIGKILL after the grace
        and drain + 10 s); 0 if they all exited 0 after a signal, else 1."""
        timeout = self.args.grace + self.args.drain + 10.0
        running = [c.process for c in self.children if c.process is not None]
        if not signalled:
            for process in running:
                if process.exitcode is not None:
                    log.error("server process %s (pid %d) exited with code %s: stopping the "
                              "others", process.name, process.pid, process.exitcode)
        for process in running:
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("server process %s (pid %d) still running %gs after SIGTERM: killed",
                          process.name, process.pid, timeout)
                process.kill()
                process.join()
        # after a signal: 0 if every running child drained cleanly (one waiting for its
        # restart was counted and logged when it died)
        return 0 if signalled and all(p.exitcode == 0 for p in running) else 1

    # --- metrics ---------------------------------------------------------------------------

    def metrics(self) -> bytes:
        """Every serving child's /metrics, merged, and the supervisor's own."""
        texts = []
        for child in self.children:
            port = child.metrics_port
            if port is None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=SCRAPE_TIMEOUT_SECONDS) as reply:
                    texts.append(reply.read().decode())
            except OSError:
                continue  # dying or restarting: its samples come back with it
        restarts = CounterMetricFamily("gradserve_process_restarts",
                                       "server processes restarted after they died",
                                       labels=["process"])
        up = GaugeMetricFamily("gradserve_process_up", "1 while the server process serves",
                               labels=["process"])
        for child in self.children:
            restarts.add_metric([str(child.index)], child.restarts)
            up.add_metric([str(child.index)], 0 if child.serving_since is None else 1)
        return merge_metrics(texts, (restarts, up))


def supervise(args, token) -> int:
    """Serve with `args.processes` children on one port until SIGTERM or SIGINT; the
    exit code (see the module's docstring)."""
    with reserve_port(args.host, args.port) as reserved:
        supervisor = _Supervisor(args, token, reserved.getsockname()[1])
        supervisor.install_signals()
        for child in supervisor.children:
            supervisor.spawn(child)
        if not supervisor.wait_ready():
            return supervisor.shutdown(signalled=supervisor.stop.is_set()
                                       and all(c.process.exitcode is None
                                               for c in supervisor.children))
        metrics = None
        if args.metrics_port is not None:
            try:
                metrics = MetricsHTTPServer(args.host, int(args.metrics_port), supervisor.metrics)
            except OSError as err:
                log.error("cannot serve metrics on %s:%s: %s", args.host, args.metrics_port, err)
                return supervisor.shutdown(signalled=False)
            log.warning("metrics on http://%s:%d/metrics (all %d processes)", args.host,
                        metrics.port, args.processes)
        log.warning("%d server processes, pids %s", len(supervisor.children),
                    " ".join(str(c.process.pid) for c in supervisor.children))
        log.warning("gradserve listening on %s:%d%s%s", args.host, supervisor.port,
                    " (TLS)" if args.tls_cert else "", " (token required)" if token else "")
        try:
            return supervisor.run()
        finally:
            if metrics is not None:
                metrics.close()


def _child_main(args, token, port, index, ready, parent, mask) -> None:
    stop = StopRequest()  # not a threading.Event: see StopRequest
    for sig in SIGNALS:
        signal.signal(sig, stop.set)
    try:  # die with the parent rather than serve on as an orphan
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if os.getppid() != parent:
        sys.exit(0)  # the parent died before PR_SET_PDEATHSIG took effect

    def serving(server) -> None:
        ready.send(server.metrics_port)
        ready.close()
    sys.exit(serve_one(args, token, port=port, stop=stop, process=index, ready=serving))
