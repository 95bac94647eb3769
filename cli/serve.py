"""`gradserve serve`: flags (each also GRADSERVE_<FLAG>), then serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from dataclasses import fields

from gradserve.server.allocator import keep_freed_memory
from gradserve.server.app import EVENT_LOOPS, TLSConfig, create_server
from gradserve.server.auth import TokenFileError, read_token
from gradserve.server.blas import MAX_PRESSURE, MIN_FLOPS, BlasPolicy, usable_cpus
from gradserve.server.kernels import CHOICES as KERNEL_CHOICES
from gradserve.server.kernels import KernelProviderError, check_kernels, start_kernels
from gradserve.server.lean import DEFAULT_INLINE_BUDGET_US
from gradserve.server.limits import Limits

DEFAULT_PORT = 50051
# Shorter than every stop timeout we ship, so a call the grace lets finish is never
# killed: docker and podman stop (10 s), compose.yaml's stop_grace_period (20 s),
# deploy/kubernetes' terminationGracePeriodSeconds (30 s).
DEFAULT_GRACE = 8.0
# Seconds between health turning NOT_SERVING and new calls being refused: calls that
# arrive meanwhile (sent before the client saw NOT_SERVING) are still served, not cut
# by grpc's shutdown race. Counted within the grace.
DEFAULT_DRAIN = 0.5
# Seconds after which a connection gets GOAWAY and its client reconnects, resolving the
# service's name again: clients of a DNS name (a Kubernetes headless Service) use a
# replica added after they connected within about this long (gRPC resolves again only
# when a connection closes). A reconnection costs one TCP (and TLS) handshake.
DEFAULT_MAX_CONNECTION_AGE = 5.0
# Seconds calls in flight get on such a connection before it closes: the Client's
# default deadline (30 s), so that no call it makes is cut. A longer call (or a
# DifferentiateStream) is ended UNAVAILABLE then, which the Client retries.
DEFAULT_MAX_CONNECTION_AGE_GRACE = 30.0
# The server's own messages keep the library's logger name, as before the command moved.
log = logging.getLogger("gradserve.server")


class StopRequest:
    """Set by SIGTERM or SIGINT, waited for by the main thread. A plain attribute, not a
    threading.Event: a signal handler runs in the main thread between two bytecodes,
    and Event.set() takes the lock that Event.wait() holds for a few bytecodes on its
    way in, so a signal landing there (likelier on a loaded machine, where the main
    thread waits for the GIL right there) deadlocked the server: it never exited."""

    POLL_SECONDS = 0.05

    def __init__(self):
        self.requested = False

    def set(self, *_) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested

    def wait(self) -> None:
        while not self.requested:
            time.sleep(self.POLL_SECONDS)


def env(name: str, default):
    """GRADSERVE_<NAME> from the environment, or `default`."""
    return os.environ.get("GRADSERVE_" + name, default)


def add_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default=env("HOST", "127.0.0.1"),
                       help="address to bind; 0.0.0.0 for all interfaces, e.g. in a container "
                            "(default: %(default)s)")
    serve.add_argument("--port", type=int, default=int(env("PORT", DEFAULT_PORT)),
                       help="port to bind, 0 picks a free one (default: %(default)s)")
    serve.add_argument("--processes", type=int,
                       default=int(env("PROCESSES", 0)) or default_processes(), metavar="N",
                       help="server processes sharing the port (SO_REUSEPORT), each with "
                            "its own GIL, workers and graph cache; connections, not calls, "
                            "are spread over them; one that dies is restarted with backoff "
                            "while the others serve. 1 serves in this process (default: the "
                            "CPUs this process may use, within a cgroup CPU limit: "
                            "%(default)s)")
    serve.add_argument("--max-workers", type=int, default=int(env("MAX_WORKERS", 16)),
                       help="threads computing requests; waiting calls and streams hold "
                            "none (default: %(default)s)")
    serve.add_argument("--blas-threads", type=int, default=int(env("BLAS_THREADS", 1)),
                       metavar="N",
                       help="threads each BLAS matrix product may use; 0 keeps the BLAS "
                            "library's default (one per core). Calls already run in parallel "
                            "on the worker threads: more BLAS threads oversubscribe the cores "
                            "and, on a busy machine, wait for descheduled helpers (10x "
                            "slower here). A large request alone on the server runs wider: "
                            "see --blas-threads-alone (default: %(default)s)")
    serve.add_argument("--blas-threads-alone", type=int,
                       default=int(env("BLAS_THREADS_ALONE", usable_cpus())), metavar="N",
                       help="threads the BLAS products of a large request (estimated at "
                            f"{MIN_FLOPS:,} floating-point operations or more) may use "
                            "while it is the only request in progress and the CPUs are not "
                            "contended (--blas-alone-max-pressure); a request admitted "
                            "meanwhile narrows them back to --blas-threads. At most "
                            "--blas-threads turns it off "
                            "(default: the CPUs this process may use, %(default)s)")
    serve.add_argument("--blas-alone-max-pressure", type=float,
                       default=float(env("BLAS_ALONE_MAX_PRESSURE", MAX_PRESSURE)),
                       metavar="PERCENT",
                       help="a large request alone runs wide only while, in the last 10 s, "
                            "tasks waited for a CPU at most this share of the time (Linux's "
                            "CPU pressure, of the container's cgroup or else the machine); "
                            "100 does not read it (default: %(default)s)")
    serve.add_argument("--event-loop", default=env("EVENT_LOOP", "auto"), choices=EVENT_LOOPS,
                       help="the server's event loop: uvloop is installed with gradserve (not on "
                            "Windows); auto takes it when it can be imported, else asyncio's "
                            "own (default: %(default)s)")
    serve.add_argument("--kernels", default=os.environ.get("GRADSERVE_KERNELS", "numpy"),
                       choices=KERNEL_CHOICES,
                       help="the engine's kernel provider for convolutions: numpy's (built "
                            "in, the default), or numba's compiled depthwise-conv loops, "
                            "which need the numba extra (pip install 'gradserve[numba]'); "
                            "auto takes numba when it imports, else numpy. numba's kernels "
                            "compile (or load from numba's cache) in the background from "
                            "start. Also GRADSERVE_KERNELS (default: %(default)s)")
    serve.add_argument("--inline-budget-us", type=float,
                       default=float(env("INLINE_BUDGET_US", DEFAULT_INLINE_BUDGET_US)),
                       metavar="US",
                       help="small Evaluate/Differentiate/TrainSteps requests by graph id whose "
                            "estimated time (graph nodes and FLOPs, measured constants) is "
                            "within this many microseconds are answered on the event loop, "
                            "skipping the hand-off to a worker thread; longer ones go to a "
                            "worker. It bounds how long one request can delay health checks "
                            "and other calls' I/O. 0 sends every request to a worker "
                            "(default: %(default)s)")
    serve.add_argument("--no-malloc-tuning", action="store_true",
                       default=env("NO_MALLOC_TUNING", "") not in ("", "0"),
                       help="keep glibc's default malloc thresholds. By default the server "
                            "raises them (mmap 32 MiB, trim 1 GiB) so that large requests "
                            "reuse freed memory instead of page-faulting fresh pages (a 16 "
                            "MiB gradient call ~2x faster); the process's RSS then stays "
                            "near its peak instead of shrinking after large calls")
    serve.add_argument("--grace", type=float, default=float(env("GRACE", DEFAULT_GRACE)),
                       help="seconds in-flight calls get to finish on shutdown (default: %(default)s)")
    serve.add_argument("--drain", type=float, default=float(env("DRAIN", DEFAULT_DRAIN)),
                       help="on shutdown, seconds health is NOT_SERVING while new calls are "
                            "still served, before they are refused UNAVAILABLE; part of "
                            "--grace (default: %(default)s)")
    serve.add_argument("--max-connection-age", type=float, metavar="SECONDS",
                       default=float(env("MAX_CONNECTION_AGE", DEFAULT_MAX_CONNECTION_AGE)),
                       help="ask each client connection to reconnect (HTTP/2 GOAWAY) once "
                            "this old, so that clients resolve the service name again and "
                            "use replicas added since: gRPC clients re-resolve DNS only when "
                            "a connection closes. 0: never (default: %(default)s)")
    serve.add_argument("--max-connection-age-grace", type=float, metavar="SECONDS",
                       default=float(env("MAX_CONNECTION_AGE_GRACE",
                                         DEFAULT_MAX_CONNECTION_AGE_GRACE)),
                       help="seconds calls in flight on such a connection get to finish "
                            "before it closes (the Client's default deadline, so none of "
                            "its calls is cut; longer calls end UNAVAILABLE and are "
                            "retried). 0: unbounded (default: %(default)s)")
    serve.add_argument("--no-reflection", action="store_true",
                       default=env("NO_REFLECTION", "") not in ("", "0"),
                       help="turn off gRPC server reflection")
    serve.add_argument("--metrics-port", type=int, default=env("METRICS_PORT", None),
                       help="serve Prometheus metrics at http://HOST:PORT/metrics, those of "
                            "all --processes on this one port, each sample labelled "
                            "process=\"I\" (default: off; 0 picks a free port)")
    serve.add_argument("--auth-token-file", default=env("AUTH_TOKEN_FILE", None),
                       metavar="PATH", help="require 'authorization: Bearer <token>' on every "
                       "call but health checks; the token is the file's content")
    serve.add_argument("--tls-cert", default=env("TLS_CERT", None), metavar="PEM",
                       help="serve TLS with this certificate chain (needs --tls-key)")
    serve.add_argument("--tls-key", default=env("TLS_KEY", None), metavar="PEM",
                       help="the certificate's private key")
    serve.add_argument("--tls-client-ca", default=env("TLS_CLIENT_CA", None), metavar="PEM",
                       help="mutual TLS: clients must present a certificate signed by this CA")
    serve.add_argument("--log-level", default=env("LOG_LEVEL", "warning"),
                       choices=["debug", "info", "warning", "error"],
                       help="log level; info adds one JSON line per request with method, "
                            "graph_id, mode, status code and milliseconds "
                            "(default: %(default)s)")
    defaults = Limits()
    for f in fields(Limits):
        serve.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                           help=f"default {getattr(defaults, f.name):,}, or GRADSERVE_{f.name.upper()}")


def default_processes() -> int:
    """The CPUs this process may use (server.blas.usable_cpus)."""
    return usable_cpus()


def run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.blas_threads < 0 or args.blas_threads_alone < 0:
        raise SystemExit("gradserve serve: --blas-threads and --blas-threads-alone must "
                         "be >= 0")
    if not 0 <= args.blas_alone_max_pressure <= 100:
        raise SystemExit("gradserve serve: --blas-alone-max-pressure must be within 0-100")
    if args.max_connection_age < 0 or args.max_connection_age_grace < 0:
        raise SystemExit("gradserve serve: --max-connection-age and "
                         "--max-connection-age-grace must be >= 0")
    if args.processes < 1:
        raise SystemExit("gradserve serve: --processes must be >= 1")
    if args.inline_budget_us < 0:
        raise SystemExit("gradserve serve: --inline-budget-us must be >= 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("gradserve serve: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("gradserve serve: --tls-client-ca needs --tls-cert and --tls-key")
    try:
        token = read_token(args.auth_token_file) if args.auth_token_file else None
    except TokenFileError as err:
        raise SystemExit(f"gradserve serve: {err}") from None
    try:  # a bad choice is one message here, not one per server process
        check_kernels(args.kernels)
    except KernelProviderError as err:
        raise SystemExit(f"gradserve serve: --kernels: {err}") from None
    if args.processes > 1:
        from .supervise import supervise
        return supervise(args, token)
    return serve_one(args, token)


def serve_one(args, token, port: int | None = None, stop: StopRequest | None = None,
              process: int | None = None, ready=None) -> int:
    """Serve in this process until SIGTERM or SIGINT (one of --processes when `process`
    is its index: bound to `port`, metrics labelled with it, `ready()` once serving)."""
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.blas_threads, user_api="blas")  # for the process
    if not args.no_malloc_tuning and not keep_freed_memory():
        log.warning("could not raise malloc's thresholds (not glibc?): large requests "
                    "page-fault fresh memory")
    try:  # --kernels numba: compiled in the background (logged when ready)
        start_kernels(args.kernels, announce=process is None or process == 0)
    except KernelProviderError as err:
        raise SystemExit(f"gradserve serve: --kernels: {err}") from None
    overrides = {f.name: getattr(args, f.name) for f in fields(Limits)}
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    address = f"{args.host}:{args.port if port is None else port}"
    try:  # only the --processes supervisor's own children share a port (SO_REUSEPORT)
        server = create_server(address, Limits.from_env(**overrides), args.max_workers,
                               not args.no_reflection, token, tls, event_loop=args.event_loop,
                               reuse_port=process is not None,
                               max_connection_age=args.max_connection_age,
                               max_connection_age_grace=args.max_connection_age_grace,
                               inline_budget_us=args.inline_budget_us,
                               blas=BlasPolicy(args.blas_threads_alone,
                                               max_pressure=args.blas_alone_max_pressure))
    except OSError as err:
        raise SystemExit(f"gradserve serve: cannot serve on {address}: {err}") from None
    metrics_port = args.metrics_port
    if metrics_port is not None and process is not None:
        metrics_port = 0  # on loopback, for the supervisor, which serves them all on one port
    return serve_until_signal(server, args.host, metrics_port, args.grace,
                              tls is not None, token is not None, args.drain, stop=stop,
                              process=process, ready=ready)


def serve_until_signal(server, host: str, metrics_port: int | None, grace: float,
                       tls: bool, token: bool, drain: float = DEFAULT_DRAIN, *,
                       stop: StopRequest | None = None, process: int | None = None,
                       ready=None) -> int:
    """Start `server`, run until SIGTERM or SIGINT (or `stop` is set), then shut down
    cleanly; the exit code. As one of several processes (`process`, its index), metrics
    are served on loopback for the supervisor, carrying a `process` label, and
    `ready(server)` replaces the "listening" line, which the supervisor logs once for all."""
    if stop is None:
        stop = StopRequest()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before serving: a SIGTERM always drains
            signal.signal(sig, stop.set)
    labels = None if process is None else {"process": str(process)}
    metrics_host = host if process is None else "127.0.0.1"
    server.start(None if metrics_port is None else (metrics_host, int(metrics_port)), labels)
    if server.metrics_port is not None and process is None:
        log.warning("metrics on http://%s:%d/metrics", host, server.metrics_port)
    if ready is not None:
        ready(server)
    else:
        log.warning("gradserve listening on %s:%d%s%s", host, server.port,
                    " (TLS)" if tls else "", " (token required)" if token else "")
    stop.wait()
    log.warning("shutting down: health NOT_SERVING, new calls served %gs more, then calls "
                "in flight finish (up to %gs in all)", min(drain, grace), grace)
    server.stop(grace, drain=drain)
    left = server.servicer.calls.working
    if left:  # cut at the grace's end, but inside one step the engine cannot interrupt
        log.warning("exiting with %d request(s) still computing after the grace", left)
        logging.shutdown()
        os._exit(0)  # a normal exit would wait for the worker threads
    return 0
