"""Client: numpy arrays in, values and derivatives out, over gRPC.

A graph (a GraphBuilder or a Graph proto) is registered once per client and
then sent by id. When a server answers NOT_FOUND (it restarted, or another
replica answered) the client sends the request once more with the graph
inline, which that server compiles and caches; UNAVAILABLE, and CANCELLED that
the client did not cause (a server shutting down reports some calls so), are
retried with exponential backoff; every call, and every reply on a stream, has a
deadline. `channels=N` opens N connections and spreads calls over them (a server
with --processes N gets one per process); `differentiate_async` and
`evaluate_async` return futures, for many calls in flight without a thread each.
Arrays in results are read-only views of the received bytes (np.array(a) makes
a writable copy): requests and replies carrying tensors are written and read by
gradserve.v1.tensor_wire, without protobuf's copies of the tensor data.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import queue
import socket
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import grpc
import numpy as np

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1 import graph_pb2
from gradserve.v1.chunks import CHUNK_BYTES
from gradserve.v1.codec import DTYPES, from_tensor
from gradserve.v1.modes import SPARSITY_NAMES, WIRE_MODES, WIRE_SPARSITY, mode_name
from gradserve.v1.tensor_wire import SMALL_TENSOR_BYTES, TensorMessage, _varint_bytes, decode
from gradserve.v1.tensor_wire import read_varint as _varint

from . import store
from .builder import GraphBuilder
from .pages import PagePool
from .render import trace_dot
from .sparse import block_value
from .store import TensorHandle

MAX_MESSAGE_BYTES = 256 << 20
INLINE_AFTER_NOT_FOUND = 16  # calls sent with the graph inline after a NOT_FOUND
# A request with more tensor bytes than this asks the server for its message limit once
# (GetServerInfo); over half that limit, its large inputs go by the tensor store.
STORE_CHECK_BYTES = 1 << 20
PUT_CHECK_BYTES = 64 << 10  # a larger put asks the server's message limit (once) for its chunks
_WIRE_CODES = {dtype: code for code, dtype in DTYPES.items()}  # little-endian dtypes
_STREAM_END = object()


@dataclass(frozen=True)
class PlannerDecision:
    """The server's mode decision and its figures (costs in forward directions)."""

    mode: str
    n: int
    m: int
    cost_forward: float
    cost_reverse: float
    reason: str
    # "sparse" when the derivatives came from compressed sweeps (one direction per color
    # of the sparsity pattern), with the pattern's nonzeros and colors each way.
    sparsity: str = "dense"
    nnz: int = -1
    colors_forward: int = 0
    colors_reverse: int = 0


def decision_from_proto(p) -> PlannerDecision:
    return PlannerDecision(mode_name(p.mode) or "", p.n, p.m, p.cost_forward, p.cost_reverse,
                           p.reason, SPARSITY_NAMES.get(p.sparsity, "dense"), p.nnz,
                           p.colors_forward, p.colors_reverse)


@dataclass(frozen=True)
class EdgeTrace:
    """A node reading one input: forward mode's partial (elementwise ops) and tangent
    carried, reverse mode's cotangent flowing back; None where absent."""

    input: str
    partial: np.ndarray | None = None
    tangent: np.ndarray | None = None
    cotangent: np.ndarray | None = None


@dataclass(frozen=True)
class NodeTrace:
    """One value the server computed: an input, a constant or a node (see the
    Trace message in gradient_service.proto)."""

    name: str
    op: str  # the op, or "input" / "constant"
    inputs: tuple
    value: np.ndarray
    tangent: np.ndarray | None = None
    adjoint: np.ndarray | None = None
    edges: tuple = ()


@dataclass
class Result:
    outputs: dict
    jacobian: dict = field(default_factory=dict)  # (of, wrt) -> of.shape + wrt.shape
    tangents: dict = field(default_factory=dict)  # JVP: output name -> tangent
    cotangents: dict = field(default_factory=dict)  # VJP: input name -> cotangent
    mode: str = ""
    planner: PlannerDecision | None = None
    graph_id: str = ""
    request_id: str = ""
    trace: list | None = None  # NodeTrace per value, when asked for with trace=True
    trace_mode: str = ""  # the trace's mode: "forward" or "reverse"
    # differentiate(..., store_results=True): the derivatives' handle on the server
    results_handle: TensorHandle | None = None

    def to_dot(self, mode: str | None = None, **options) -> str:
        """Graphviz DOT of the traced computation (see gradserve.client.render.trace_dot);
        `mode` defaults to the trace's own."""
        if self.trace is None:
            raise ValueError("this result has no trace: ask for one with "
                             "differentiate(..., trace=True)")
        return trace_dot(self.trace, mode or self.trace_mode, outputs=tuple(self.outputs),
                         **options)


@dataclass(frozen=True)
class TrainStepsResult:
    """Client.train_steps: the state after K SGD steps, and each step's loss."""

    parameters: dict
    velocity: dict
    losses: list
    # On a stored state (train_steps with a TensorHandle): its new version, the steps
    # it has taken, and the evaluation asked for (outputs by name)
    state_version: int = 0
    state_steps: int = 0
    evaluation: dict = field(default_factory=dict)


def _train_steps_result(reply) -> TrainStepsResult:
    message = reply.message  # (its other fields: the generated message's own)
    return TrainStepsResult(reply.parameters, reply.velocity, list(message.losses),
                            message.state_version, message.state_steps, reply.evaluation)


def result_from_proto(reply) -> Result:
    """The Result of a DifferentiateResponse: a generated message, or a TensorMessage
    as the Client receives it. Arrays are read-only, checked as tensor_wire checks
    them (errors name the field)."""
    if isinstance(reply, TensorMessage):
        outputs, tangents, cotangents = reply.outputs, reply.tangents, reply.cotangents
        jacobian = {(b.of, b.wrt): block_value(b, value) for b, value in reply.jacobian}
    else:  # the generated message: its arrays read from its own tensors
        outputs, tangents, cotangents = (_arrays(reply, name)
                                         for name in ("outputs", "tangents", "cotangents"))
        jacobian = {(b.of, b.wrt): block_value(b, from_tensor(b.value,
                                                              f"jacobian[{b.of}, {b.wrt}]"))
                    for b in reply.jacobian}
    has_trace = reply.HasField("trace")
    return Result(
        outputs=outputs, jacobian=jacobian, tangents=tangents, cotangents=cotangents,
        mode=mode_name(reply.mode) or "",
        planner=_decision(reply.planner),
        graph_id=reply.graph_id, request_id=reply.request_id,
        trace=trace_from_proto(reply.trace) if has_trace else None,
        trace_mode=(mode_name(reply.trace.mode) or "") if has_trace else "",
        results_handle=(TensorHandle(reply.results_handle, None)
                        if reply.results_handle else None))


def _arrays(reply, name: str) -> dict:
    tensors = getattr(reply, name)
    return {key: from_tensor(t, name, None, key) for key, t in tensors.items()} if tensors else {}


_DECISIONS: dict = {}  # a PlannerDecision message's bytes -> its PlannerDecision
_DECISIONS_KEPT = 256  # (then forgotten, all at once)


def _decision(p) -> PlannerDecision:
    """decision_from_proto(p), kept by p's bytes: a graph's calls of one kind repeat it
    (a PlannerDecision is immutable, so it is shared)."""
    data = p.SerializeToString()
    decision = _DECISIONS.get(data)
    if decision is None:
        if len(_DECISIONS) >= _DECISIONS_KEPT:
            _DECISIONS.clear()
        decision = _DECISIONS[data] = decision_from_proto(p)
    return decision


def trace_from_proto(trace: pb.Trace) -> list:
    """NodeTrace per value, arrays decoded (read-only views of the received bytes)."""
    def array(message, name, where):
        return from_tensor(getattr(message, name), where) if message.HasField(name) else None

    nodes = []
    for n in trace.nodes:
        where = f"trace['{n.name}']"
        edges = tuple(EdgeTrace(e.input, *(array(e, f, f"{where}.edges['{e.input}'].{f}")
                                           for f in ("partial", "tangent", "cotangent")))
                      for e in n.edges)
        nodes.append(NodeTrace(n.name, n.op, tuple(n.inputs), array(n, "value", where),
                               array(n, "tangent", where), array(n, "adjoint", where), edges))
    return nodes


def _target(address: str | Iterable[str]) -> tuple[str, list]:
    """One address or target (e.g. dns:///gradserve-headless:50051), or several
    host:port addresses; calls are spread over every address resolved, round-robin."""
    addresses = [address] if isinstance(address, str) else list(address)
    target = (addresses[0] if len(addresses) == 1
              else "ipv4:" + ",".join(_ipv4(a) for a in addresses))
    return target, [("grpc.lb_policy_name", "round_robin")]


def _peers(address: str | Iterable[str]) -> list[tuple[str, str]]:
    """(host:port with an IPv4 host, the name it was resolved from or "") of each
    server a target spreads calls over, when there are several; [] for one (or a
    target of another scheme, or a name that does not resolve now)."""
    addresses = [address] if isinstance(address, str) else list(address)
    peers = []
    for a in addresses:
        if a.startswith("dns:"):
            a = a[4:].lstrip("/")
        elif a.partition(":")[0] in ("unix", "unix-abstract", "ipv4", "ipv6", "vsock",
                                     "xds"):
            return []  # taken as given
        host, _, port = a.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
            peers.append((a, ""))
            continue
        except ValueError:
            pass
        try:
            info = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        peers += [(f"{ip}:{port}", host) for ip in dict.fromkeys(i[4][0] for i in info)]
    peers = list(dict.fromkeys(peers))
    return peers if len({p for p, _ in peers}) > 1 else []


def _ipv4(address: str) -> str:
    """host:port with the host resolved to an IPv4 address (the ipv4: target needs it)."""
    host, _, port = address.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        return address
    except ValueError:
        info = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        return f"{info[0][4][0]}:{port}"


@dataclass(frozen=True)
class TLS:
    """PEM files for a TLS channel: the CA that signed the server's certificate
    (None: the system's roots) and, for mutual TLS, the client's certificate and key."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return None if path is None else Path(path).read_bytes()
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class Client:
    """A connection to a gradserve server (or several replicas).

    `timeout` is each call's deadline in seconds (on a `stream()`, each reply's);
    `retries` how often UNAVAILABLE is retried, waiting `backoff`, then twice as
    long each time (at most 2 s).
    `token` is sent as `authorization: Bearer <token>`; `tls` (a TLS) makes the
    channel secure.

    `channels` connections are opened (default 1) and calls, retries included, take
    them in turn. A server's processes (gradserve serve --processes N) are shared
    out by connection, not by call, so one connection keeps all of one client's
    calls on one process: raise `channels` to N (or more: the kernel places each
    connection at random) when this client alone should load all N processes, with
    several calls in flight (threads, or the *_async methods). One connection is
    enough for sequential calls, and for many clients, which spread by themselves.
    """

    def __init__(self, address: str | Iterable[str] = "127.0.0.1:50051", *,
                 timeout: float = 30.0, retries: int = 5, backoff: float = 0.05,
                 token: str | None = None, tls: TLS | None = None,
                 options: list | None = None, channels: int = 1):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, not {channels}")
        target, lb_options = _target(address)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        channel_options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A dns: target is resolved again when a connection closes (a server's
            # --max-connection-age), at most once a second (grpc's default: 30 s).
            ("grpc.dns_min_time_between_resolutions_ms", 1000),
            *lb_options, *(options or [])]
        if channels > 1:  # else grpc shares one connection between equal channels
            channel_options.append(("grpc.use_local_subchannel_pool", 1))
        self._channels = [
            grpc.secure_channel(target, tls.credentials(), channel_options) if tls
            else grpc.insecure_channel(target, channel_options) for _ in range(channels)]
        self._stubs = [_stub(channel) for channel in self._channels]
        # Stored tensors live on one server: behind several addresses (a list, or a name
        # resolving to several), a put and the calls naming its tensors go over a
        # channel of their own to one address (_store_stub), not round-robin.
        self._peers, self._pin_turn, self._pinned = _peers(address), 0, {}
        self._pin_options = [(k, v) for k, v in channel_options
                             if k != "grpc.lb_policy_name"]
        self._tls = tls
        self._next_stub = itertools.cycle(self._stubs).__next__  # round-robin
        # The first channel's generated stub and tensor_wire stub, as before the pool.
        self._stub = pb_grpc.GradientServiceStub(self._channels[0])
        self._tensor_stub = _TensorStub(self._channels[0])
        self._ids: dict[str, str] = {}  # sha256 of the graph's bytes -> server's graph id
        self._inline_left: dict[str, int] = {}  # sha256 -> calls still to send inline
        # handle id -> the TensorHandle this client put under it (to put again, see
        # _put_again); a handle the program drops leaves by itself
        self._handles: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._pages = PagePool()  # get's large arrays: pages used again once dropped
        self._server_message_bytes: int | None = None  # learned when a request is large
        # pieces of small requests' bytes (_small_request), each bounded by _SMALL_KEPT
        self._small_heads: dict = {}  # (name, dtype, shape) -> an input's header
        self._small_frames: dict = {}  # (graph id, wrt, of, mode) -> bytes before, after
        self._small_orders: dict = {}  # input names -> in map order
        self._small_layouts: dict = {}  # form -> _ReplyLayout of its replies

    # --- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        for channel in [*self._channels, *(c for c, _ in self._pinned.values())]:
            channel.close()
        self._pages.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- calls -------------------------------------------------------------------

    def server_info(self) -> pb.GetServerInfoResponse:
        return self._call("GetServerInfo", pb.GetServerInfoRequest())

    def register(self, graph: GraphBuilder | graph_pb2.Graph) -> str:
        """Register a graph (idempotent) and return its id."""
        return self._register(graph, force=True)

    def evaluate(self, graph, inputs: Mapping[str, np.ndarray]) -> dict:
        """Output values: name -> array. Inputs may be stored tensors (see `put`); large
        ones go by the store by themselves (see `differentiate`)."""
        return self._evaluate(graph, inputs, pb.EvaluateRequest()).outputs

    def _evaluate(self, graph, inputs, message):
        inputs, auto_put, _ = self._fit(inputs)
        try:
            inputs, refs = store.split(inputs)
            request = TensorMessage(message, {"inputs": inputs})
            return self._stored_call("Evaluate", graph, request, {"stored_inputs": refs})
        finally:
            if auto_put is not None:
                self.delete(auto_put)

    def differentiate(self, graph, inputs: Mapping[str, np.ndarray], *, wrt=None, of=None,
                      mode: str = "auto", tangents=None, cotangents=None,
                      trace: bool = False, sparsity: str | None = None,
                      store_results: bool | None = None) -> Result:
        """Values and derivatives: Jacobian blocks, or a JVP (tangents), or a VJP (cotangents).

        `trace=True` also returns every value the server computed with its tangents
        (forward, from `tangents`) or adjoints (reverse, from `cotangents`, or from 1 on
        a one-element output) and those of every edge, in `Result.trace`; draw it with
        `Result.to_dot()`.

        `sparsity` (Jacobian blocks): None lets the server compress the sweeps by the
        Jacobian's sparsity pattern when that pays, blocks staying arrays; "auto" also
        lets a block come back sparse when that is smaller, "sparse" asks for sparse
        blocks whenever a pattern is found, "dense" for no pattern at all. A sparse block
        is a scipy.sparse CSR matrix of shape (elements of of, elements of wrt), or a
        gradserve.client.sparse.SparseMatrix without scipy. `Result.planner` says what
        was done (sparsity, nnz, colors_forward, colors_reverse, reason).

        Inputs and seeds may be stored tensors (`{**client.put(params), "x": x}`).
        Big models by default: a request whose tensors pass half the server's message
        limit puts its large inputs in the tensor store (in chunks) and takes the
        derivatives back in chunks, so no message is over the limit.
        `store_results=True` leaves the derivatives on the server instead, under
        `Result.results_handle` (keys "jacobian/OF/WRT", "cotangents/WRT", ...; fetch
        with `get`, or name them in later requests); False: always in the reply.
        """
        if not trace and sparsity is None and not store_results:
            if tangents is None and cotangents is None:
                small = self._small_request(graph, inputs, wrt, of, mode)
                if small is not None:
                    return self._small_differentiate(graph, inputs, wrt, of, mode, *small)
            elif tangents is None or cotangents is None:
                seeded = self._seeded_request(graph, inputs, wrt, of, mode,
                                              "cotangents" if tangents is None else "tangents",
                                              cotangents if tangents is None else tangents)
                if seeded is not None:
                    result = self._seeded_differentiate(*seeded)
                    if result is not None:
                        return result
        inputs, auto_put, big = self._fit(inputs, tangents, cotangents)
        try:
            fetch = store_results is None and big
            refs: dict = {}  # the stored tensors' fields, as the request was filled
            request = self._differentiate_request(inputs, wrt, of, mode, tangents,
                                                  cotangents, trace, sparsity, refs)
            request.message.store_results = bool(store_results or fetch)
            result = result_from_proto(self._stored_call("Differentiate", graph, request,
                                                         refs, bound=True))
            if fetch and result.results_handle is not None:
                self._fetch_results(result)
            return result
        finally:
            if auto_put is not None:
                self.delete(auto_put)

    def differentiate_async(self, graph, inputs: Mapping[str, np.ndarray], *, wrt=None,
                            of=None, mode: str = "auto", tangents=None, cotangents=None,
                            trace: bool = False, sparsity: str | None = None) -> Future:
        """As `differentiate`, without waiting: a concurrent.futures.Future of the Result
        (or of the grpc.RpcError, with its code(), once retries are spent). Retries and
        the NOT_FOUND resend are those of `differentiate`; no thread waits for the call,
        and the reply is decoded on grpc's thread. The first call with a graph this
        client has not registered registers it, waiting for that."""
        if tangents is None and cotangents is None and not trace and sparsity is None:
            small = self._small_request(graph, inputs, wrt, of, mode)
            if small is not None:
                return self._small_differentiate_async(graph, inputs, wrt, of, mode, *small)
        request = self._differentiate_request(inputs, wrt, of, mode, tangents, cotangents,
                                              trace, sparsity)
        return self._by_id_async("Differentiate", graph, request, result_from_proto)

    def evaluate_async(self, graph, inputs: Mapping[str, np.ndarray]) -> Future:
        """As `evaluate`, without waiting: a Future of the outputs (see differentiate_async)."""
        inputs, refs = store.split(inputs)
        request = TensorMessage(pb.EvaluateRequest(), {"inputs": inputs})
        store.fill(request.message.stored_inputs, refs)
        return self._by_id_async("Evaluate", graph, request, lambda reply: reply.outputs)

    def jacobian(self, graph, inputs, *, wrt=None, of=None, mode: str = "auto",
                 sparsity: str | None = None) -> dict:
        """Jacobian blocks: (of, wrt) -> array shaped of.shape + wrt.shape (or a sparse
        matrix: see differentiate's `sparsity`)."""
        return self.differentiate(graph, inputs, wrt=wrt, of=of, mode=mode,
                                  sparsity=sparsity).jacobian

    def grad(self, graph, inputs, *, of: str | None = None, wrt=None) -> dict:
        """Gradients of one scalar output: wrt name -> array shaped like that input."""
        result = self.differentiate(graph, inputs, wrt=wrt, of=None if of is None else [of])
        outs = {o for o, _ in result.jacobian}
        if len(outs) != 1 or result.outputs[next(iter(outs))].size != 1:
            raise ValueError("grad needs exactly one scalar output; use jacobian() "
                             f"(outputs differentiated: {sorted(outs)})")
        # A block is shaped output.shape + input.shape: drop the output's (one-element)
        # dimensions, which needs no input array (a stored input is a handle's name).
        lead = np.ndim(result.outputs[next(iter(outs))])
        return {w: block.reshape(block.shape[lead:]) for (_, w), block in result.jacobian.items()}

    def jvp(self, graph, inputs, tangents) -> tuple[dict, dict]:
        """Forward mode: (outputs, output tangents)."""
        r = self.differentiate(graph, inputs, tangents=tangents)
        return r.outputs, r.tangents

    def vjp(self, graph, inputs, cotangents, *, wrt=None,
            residuals: str = "") -> tuple[dict, dict]:
        """Reverse mode: (outputs, input cotangents).

        With `residuals` (a handle from `evaluate_for_vjp` on these inputs) the server
        runs only the backward sweep and the inputs are not sent; when it no longer
        holds them (expired, evicted, or another replica answered) the call is made
        again with the inputs, transparently."""
        if residuals:
            request = self._differentiate_request({}, wrt, None, "auto", None, cotangents)
            request.message.residuals = residuals
            # cotangents as large as the inputs come back in chunks (see differentiate)
            big = request.message.store_results = self._fit(inputs, fit=False)[2]
            try:
                r = result_from_proto(self._by_id("Differentiate", graph, request))
                if big and r.results_handle is not None:
                    self._fetch_results(r)
                return r.outputs, r.cotangents
            except grpc.RpcError as err:
                if not _residuals_gone(err):
                    raise
        r = self.differentiate(graph, inputs, cotangents=cotangents, wrt=wrt)
        return r.outputs, r.cotangents

    def evaluate_for_vjp(self, graph, inputs: Mapping[str, np.ndarray]) -> tuple[dict, str]:
        """Output values, and the handle of what the server kept for a following
        `vjp(graph, inputs, cotangents, residuals=handle)`, which then skips the
        forward sweep ("" when the server kept nothing: the vjp recomputes)."""
        reply = self._evaluate(graph, inputs, pb.EvaluateRequest(keep_residuals=True))
        return reply.outputs, reply.residuals

    def hvp(self, graph, inputs, vectors, *, of: str | None = None,
            wrt=None) -> tuple[dict, dict]:
        """Second order of the scalar output `of` (default: the graph's only output):
        (gradient, Hessian-vector products), dicts by wrt input name. `vectors` has one
        array per wrt input (default wrt: its keys), shaped like the input or with a
        leading axis of k directions (the products come batched the same way)."""
        request = self._second_order_request(inputs, of, wrt, vectors=vectors)
        reply = self._stored_call("Differentiate", graph, request, {
            "stored_inputs": store.split(inputs)[1],
            "second_order.stored_vectors": store.split(vectors)[1]})
        return _gradient_and_hvp(reply)

    def hvp_with_decision(self, graph, inputs, vectors, *, of: str | None = None,
                          wrt=None) -> tuple[dict, dict, PlannerDecision]:
        """As `hvp`, with the planner's decision for the outer level as a third item
        (forward-over-reverse or reverse-over-reverse, its figures and reason)."""
        reply = self._by_id("Differentiate", graph,
                            self._second_order_request(inputs, of, wrt, vectors=vectors))
        return (*_gradient_and_hvp(reply), decision_from_proto(reply.planner))

    def hessian(self, graph, inputs, *, of: str | None = None, wrt=None,
                sparsity: str | None = None) -> dict:
        """The Hessian of the scalar output `of` (default: the graph's only output):
        blocks (wrt_a, wrt_b) -> array shaped wrt_a.shape + wrt_b.shape (default wrt:
        every floating input), or sparse matrices (see differentiate's `sparsity`: a
        sparse Hessian takes one Hessian-vector product per color of its pattern)."""
        request = self._second_order_request(inputs, of, wrt, hessian=True,
                                             sparsity=sparsity)
        reply = self._stored_call("Differentiate", graph, request,
                                  {"stored_inputs": store.split(inputs)[1]})
        return _hessian_blocks(reply)

    def train_steps(self, graph, parameters: Mapping[str, np.ndarray] | TensorHandle,
                    batches: Mapping[str, np.ndarray] | None = None, *,
                    learning_rate: float, momentum: float = 0.0,
                    velocity: Mapping[str, np.ndarray] | None = None,
                    loss: str | None = None, state_version: int = 0,
                    data: TensorHandle | None = None, rows=None, batch_sizes=None,
                    evaluate_data: TensorHandle | None = None,
                    evaluate_outputs=None, return_state: bool = False) -> "TrainStepsResult":
        """K SGD steps with momentum in one round trip (the TrainSteps RPC): `batches`
        holds every other graph input with the K minibatches stacked along a new
        leading axis. Returns the parameters and momentum buffers after the K steps
        and the K losses; nothing changes on the server, so a failed call can simply
        be made again.

        On a stored state: `parameters` a TensorHandle (`put` of the parameters, and
        momentum buffers as "velocity/NAME") and `state_version` the version it is at
        (0 after the put, then each result's `state_version`): the server updates it
        in place and the result carries no tensors (`get` the handle for them). A
        retried call with the same version does not step twice. Minibatches may then
        be rows of a stored data set: `data` (a handle of whole arrays), `rows` and
        `batch_sizes` (one per step; sizes may differ). `evaluate_data` (a handle)
        evaluates the graph after the steps, outputs `evaluate_outputs` (default all)
        in `result.evaluation`; `return_state` returns the stored state's parameters and
        buffers too."""
        request, refs = self._train_steps_request(parameters, batches, learning_rate,
                                                  momentum, velocity, loss, state_version,
                                                  data, rows, batch_sizes, evaluate_data,
                                                  evaluate_outputs, return_state)
        return _train_steps_result(self._stored_call("TrainSteps", graph, request, refs))

    def train_steps_async(self, graph, parameters: Mapping[str, np.ndarray] | TensorHandle,
                          batches: Mapping[str, np.ndarray] | None = None, *,
                          learning_rate: float, momentum: float = 0.0,
                          velocity: Mapping[str, np.ndarray] | None = None,
                          loss: str | None = None, state_version: int = 0,
                          data: TensorHandle | None = None, rows=None, batch_sizes=None,
                          evaluate_data: TensorHandle | None = None,
                          evaluate_outputs=None, return_state: bool = False) -> Future:
        """As `train_steps`, without waiting: a concurrent.futures.Future of the
        TrainStepsResult (or of the grpc.RpcError once retries are spent), as
        differentiate_async. On a stored state, a call may be sent before the previous
        one's reply has come, with the version that reply will carry (previous + 1): a
        call arriving before its predecessor stepped is refused (FAILED_PRECONDITION,
        state_version) without stepping, to be sent again; the server keeps the last
        two calls' replies for retries. A lost state is NOT_FOUND (never put again from
        the handle's arrays: the state has moved on from them)."""
        request, refs = self._train_steps_request(parameters, batches, learning_rate,
                                                  momentum, velocity, loss, state_version,
                                                  data, rows, batch_sizes, evaluate_data,
                                                  evaluate_outputs, return_state)
        self._bind(request.message, refs)
        if "state" not in refs:  # stored batches or data sets are put again if lost
            return self._by_id_async("TrainSteps", graph, request, _train_steps_result)
        future: Future = Future()
        future.set_running_or_notify_cancel()
        try:
            key = self._address_graph(graph, request)
        except BaseException as exc:  # e.g. registering the graph failed
            future.set_exception(exc)
            return future
        stub, resent = refs["state"]._stub, []

        def graph_not_found(err) -> bool:  # the graph inline once (as _by_id); else err
            if resent or not self._resend_inline(err, key, graph, request):
                return False
            resent.append(err)
            self._call_async("TrainSteps", request, future, _train_steps_result,
                             graph_not_found, stub=stub)
            return True
        self._call_async("TrainSteps", request, future, _train_steps_result, graph_not_found,
                         stub=stub)
        return future

    @staticmethod
    def _train_steps_request(parameters, batches, learning_rate, momentum, velocity, loss,
                             state_version, data, rows, batch_sizes, evaluate_data,
                             evaluate_outputs, return_state) -> tuple:
        """A TrainSteps request (a TensorMessage) and its stored references (refs of
        _stored_call)."""
        batches, batch_refs = store.split(batches or {})
        message = pb.TrainStepsRequest(loss=loss or "", learning_rate=learning_rate,
                                       momentum=momentum, return_state=return_state)
        refs: dict = {"stored_batches": batch_refs}
        state = parameters if isinstance(parameters, TensorHandle) else None
        if state is not None:
            if velocity:
                raise ValueError("with a stored state the momentum buffers are in it "
                                 "(\"velocity/NAME\"): pass no velocity")
            message.state_version = state_version
            refs["state"] = state
            parameters = None
        for name, handle in (("data", data), ("evaluate_data", evaluate_data)):
            if handle is not None:
                refs[name] = handle
        if rows is not None:
            message.rows.extend(np.asarray(rows, dtype=np.int64).tolist())
            message.batch_sizes.extend([int(n) for n in batch_sizes])
        if evaluate_outputs:
            message.evaluate_outputs.extend(evaluate_outputs)
        return TensorMessage(message, {"parameters": parameters, "batches": batches,
                                       "velocity": velocity or None}), refs

    # --- the tensor store -----------------------------------------------------------

    def put(self, tensors: Mapping[str, np.ndarray], *,
            chunk_bytes: int | None = None) -> TensorHandle:
        """Keep `tensors` on the server (PutTensors, in chunks of `chunk_bytes`, by
        default 1 MiB or half the server's message limit if less): a TensorHandle, whose
        entries requests take in place of arrays (`{**handle, "x": x}`). The handle
        keeps references to the arrays, to put them again if the server loses them (do
        not change them in place meanwhile)."""
        source = dict(tensors)
        stub = self._store_stub()
        handle = TensorHandle("", store.shapes_of(source), source=source, stub=stub)
        self._put(handle, chunk_bytes)
        return handle

    def get(self, handle: TensorHandle | str, names=None) -> dict:
        """The tensors of a handle (GetTensors, in chunks), by name: all, or `names`."""
        handle_id = handle.id if isinstance(handle, TensorHandle) else handle
        stub = (handle._stub if isinstance(handle, TensorHandle) and handle._stub
                else self._stubs[0])
        request = pb.GetTensorsRequest(handle=handle_id, names=names or ())
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                return store.assemble(stub.GetTensors(request, timeout=self.timeout,
                                                      metadata=self._metadata),
                                      self._pages.fetch())
            except grpc.RpcError as err:
                delay = self._retry_delay(err, started, attempt)
                if delay is None:
                    raise
            time.sleep(delay)

    def delete(self, handle: TensorHandle | str) -> bool:
        """Free a handle on the server (DeleteTensors); whether the server held it."""
        handle_id = handle.id if isinstance(handle, TensorHandle) else handle
        stub = (handle._stub if isinstance(handle, TensorHandle) and handle._stub
                else self._stubs[0])
        return stub.DeleteTensors(pb.DeleteTensorsRequest(handle=handle_id),
                                  timeout=self.timeout, metadata=self._metadata).deleted

    def _store_stub(self):
        """The stub a put goes over: the next channel when every call reaches one server
        (one address: a connection stays on one server process); else a channel of its
        own to one of the addresses in turn, so that the calls naming the handle's
        tensors (which go over the channel that put them) reach the server holding
        them, where round-robin would send every other call elsewhere."""
        if not self._peers:
            return self._next_stub()
        with self._lock:
            peer, host = self._peers[self._pin_turn % len(self._peers)]
            self._pin_turn += 1
            pinned = self._pinned.get(peer)
            if pinned is None:
                options = list(self._pin_options)
                if self._tls and host:  # the certificate names the host, not the IP
                    options += [("grpc.ssl_target_name_override", host),
                                ("grpc.default_authority", host)]
                channel = (grpc.secure_channel(peer, self._tls.credentials(), options)
                           if self._tls else grpc.insecure_channel(peer, options))
                pinned = self._pinned[peer] = (channel, _stub(channel))
        return pinned[1]

    def _put(self, handle: TensorHandle, chunk_bytes: int | None = None) -> None:
        """Put the handle's arrays (again), retrying UNAVAILABLE; sets handle.id."""
        if chunk_bytes is None:
            # asked (once) unless the put is tiny: a server's limit may be under a chunk
            limit = self._message_limit() if handle.data_bytes > PUT_CHECK_BYTES else 0
            chunk_bytes = min(CHUNK_BYTES, limit // 2) if limit else CHUNK_BYTES
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                reply = store.put_chunks(handle._stub.PutTensors, handle._source, chunk_bytes,
                                         self.timeout, self._metadata)
                handle.id, handle.nbytes = reply.handle, reply.nbytes
                self._handles[handle.id] = handle
                return
            except grpc.RpcError as err:
                delay = self._retry_delay(err, started, attempt)
                if delay is None:
                    raise
            time.sleep(delay)

    def _stored_call(self, method: str, graph, request, refs: dict, bound: bool = False):
        """_by_id for a request naming stored tensors: `refs` maps a request field (a
        path such as "second_order.stored_vectors") to {key: StoredTensor}, or a string
        field ("state") to a TensorHandle. Sent over the channel that put them; when the
        server no longer holds one (NOT_FOUND), the handles are put again from their
        arrays and the call made once more (handles without arrays, or a training state,
        which has moved on from its arrays: the error). `bound`: the request's fields
        already hold the handles' current ids (filled as it was built)."""
        handles = {v for v in refs.values() if isinstance(v, TensorHandle)}
        handles.update(r.handle for v in refs.values() if isinstance(v, dict)
                       for r in v.values())
        if not handles:
            return self._by_id(method, graph, request)
        if not bound:
            self._bind(request.message, refs)
        stub = next((h._stub for h in handles if h._stub is not None), None)
        try:
            return self._by_id(method, graph, request, stub=stub)
        except grpc.RpcError as err:
            if (not store.stored_gone(err) or "state" in refs
                    or any(h._source is None for h in handles)):
                raise
        for handle in handles:
            self._put(handle)
        self._bind(request.message, refs)
        return self._by_id(method, graph, request, stub=stub)

    def _named_handles(self, message) -> list[TensorHandle] | None:
        """The handles this client put that a request names (None: it names one this
        client cannot put again, such as another client's or a stored result)."""
        handles = [self._handles.get(i) for i in sorted(store.named_ids(message))]
        if any(h is None or h._source is None for h in handles):
            return None
        return handles

    def _stub_of(self, message):
        """The stub of the channel that holds the stored tensors a request names (their
        calls go there), or None."""
        return next((h._stub for h in self._named_handles(message) or () if h._stub), None)

    def _put_again(self, message) -> bool:
        """After a NOT_FOUND for stored tensors: put the handles a request names again
        from their arrays and point the request at the new ids; whether it could."""
        handles = self._named_handles(message)
        if not handles:
            return False
        for handle in handles:
            old = handle.id
            self._put(handle)
            store.rename(message, old, handle.id)
        return True

    @staticmethod
    def _bind(message, refs: dict) -> None:
        """Write the handles' current ids into the request's fields."""
        for path, value in refs.items():
            *parents, name = path.split(".")
            target = message
            for parent in parents:
                target = getattr(target, parent)
            if isinstance(value, TensorHandle):
                setattr(target, name, value.id)
            elif value:
                store.fill(getattr(target, name), value)

    def _fit(self, inputs, tangents=None, cotangents=None, fit=True):
        """Big models by default: (inputs, the handle put for this call or None, whether
        the request is big). A request whose tensors (inline and stored) pass half the
        server's message limit is big: its large inline inputs go by the store (with
        `fit`)."""
        arrays, refs = store.split(inputs)
        sizes = {k: np.asarray(a).nbytes for k, a in arrays.items()}
        total = (sum(sizes.values()) + sum(r.nbytes for r in refs.values())
                 + sum(np.asarray(a).nbytes for seeds in (tangents, cotangents)
                       for a in store.split(seeds or {})[0].values()))
        if total <= STORE_CHECK_BYTES:
            return inputs, None, False
        limit = self._message_limit()
        if not limit or total <= limit // 2:
            return inputs, None, False
        if not fit:
            return inputs, None, True
        large, inline = {}, sum(sizes.values())
        for k in sorted(sizes, key=sizes.get, reverse=True):  # the largest go first
            if inline <= limit // 4:
                break
            large[k] = arrays[k]
            inline -= sizes[k]
        if not large:
            return inputs, None, True
        handle = self.put(large)
        return {**inputs, **{k: handle[k] for k in large}}, handle, True

    def _message_limit(self) -> int:
        """The server's max_message_bytes (asked once)."""
        if self._server_message_bytes is None:
            self._server_message_bytes = self.server_info().limits.max_message_bytes
        return self._server_message_bytes

    def _fetch_results(self, result: "Result") -> None:
        """Move stored derivatives (store_results) into `result`, and free them."""
        handle = result.results_handle
        tensors = self.get(handle)
        self.delete(handle)
        result.results_handle = None
        outputs = sorted(result.outputs, key=len, reverse=True)
        for key, array in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "jacobian":
                of = next((o for o in outputs if rest.startswith(o + "/")), None)
                if of is not None:
                    result.jacobian[of, rest[len(of) + 1:]] = array
            elif kind in ("tangents", "cotangents"):
                getattr(result, kind)[rest] = array

    def stream(self, graph) -> "DifferentiateSession":
        """Many Differentiate steps of one graph over one DifferentiateStream (see
        DifferentiateSession: each reply has the client's `timeout` as its deadline)."""
        return DifferentiateSession(self, graph)

    # --- small requests ----------------------------------------------------------
    # A Jacobian request of a few arrays (under SMALL_TENSOR_BYTES in all) for a graph
    # the server knows by id is the common call, and its round trip is short: its bytes
    # are written by the generated code straight from the arrays and its reply read the
    # same way, without the tensor store's and the tensor codec's steps (which have
    # nothing to do for it). Retries, the NOT_FOUND resend and errors are the general
    # path's: a graph not yet registered, or sent inline after a NOT_FOUND, takes it.

    def _small_request(self, graph, inputs, wrt, of, mode):
        """(request bytes, request id, the graph's key or None for an id, the form: graph
        id, wrt, of, mode) of a small Jacobian request by graph id, or None: the general
        path sends it. The bytes are
        the generated code's (deterministic: fields by number, map entries by key) from
        pieces it wrote once: the graph id, each input's header by name, dtype and
        shape, and `wrt`, `of` and the mode; only the arrays' data and the request id
        are new."""
        if isinstance(wrt, str) or isinstance(of, str) or mode not in WIRE_MODES:
            return None
        heads = self._small_heads
        parts = [b""]
        total = 0
        for name in self._small_order(inputs):
            array = inputs[name]
            if type(array) is not np.ndarray:  # a StoredTensor, a list, a scalar
                return None
            head = heads.get((name, array.dtype, array.shape))
            if head is None:
                head = _input_head(name, array)
                if head is None:
                    return None
                _remember(heads, (name, array.dtype, array.shape), head)
            total += array.nbytes
            parts.append(head)
            parts.append(array.tobytes())
        if total >= SMALL_TENSOR_BYTES:
            return None
        if isinstance(graph, str):
            graph_id, key = graph, None
        else:
            key = _serialized(graph)[1]
            with self._lock:
                graph_id = self._ids.get(key)
                if graph_id is None or self._inline_left.get(key, 0):
                    return None
        form = (graph_id, tuple(wrt or ()), tuple(of or ()), mode)
        frame = self._small_frames.get(form)
        if frame is None:
            frame = _remember(self._small_frames, form, (
                pb.DifferentiateRequest(graph_id=graph_id).SerializeToString(),
                pb.DifferentiateRequest(wrt=form[1], of=form[2], mode=WIRE_MODES[mode])
                .SerializeToString(deterministic=True)))
        request_id = str(next(self._request_ids))
        parts[0] = frame[0]
        parts.append(frame[1])
        parts.append(_REQUEST_ID_KEY + bytes([len(request_id)]) + request_id.encode())
        return b"".join(parts), request_id, key, form

    def _seeded_request(self, graph, inputs, wrt, of, mode, field: str, seeds):
        """(request bytes, request id, form, stub) of a JVP or VJP request by graph id
        whose inputs are arrays or stored tensors and whose seeds (`field`: "tangents" or
        "cotangents") are arrays, small enough not to be big (_fit: at most
        STORE_CHECK_BYTES of tensors, stored ones included), or None: the general path
        sends it. Its bytes are the generated code's (deterministic) from pieces written
        once per form: the graph id; wrt, of and the mode; the stored tensors' map (their
        handles' current ids); each tensor's header by field, name, dtype and shape."""
        if isinstance(wrt, str) or isinstance(of, str) or mode not in WIRE_MODES \
                or not isinstance(seeds, Mapping) or not seeds:
            return None
        heads = self._small_heads
        parts = [b""]
        total = 0
        stored = []
        for name in self._small_order(inputs):
            value = inputs[name]
            if type(value) is store.StoredTensor:
                stored.append((name, value))
                total += value.nbytes
                continue
            if type(value) is not np.ndarray:  # a list, a scalar: the general path
                return None
            head = heads.get(("inputs", name, value.dtype, value.shape))
            if head is None:
                head = _input_head(name, value)
                if head is None:
                    return None
                _remember(heads, ("inputs", name, value.dtype, value.shape), head)
            total += value.nbytes
            parts.append(head)
            parts.append(value.tobytes())
        middle = len(parts)
        parts.append(b"")  # wrt, of and the mode
        for name in self._small_order(seeds):
            value = seeds[name]
            if type(value) is not np.ndarray:
                return None
            head = heads.get((field, name, value.dtype, value.shape))
            if head is None:
                head = _input_head(name, value, field)
                if head is None:
                    return None
                _remember(heads, (field, name, value.dtype, value.shape), head)
            total += value.nbytes
            parts.append(head)
            parts.append(value.tobytes())
        if total > STORE_CHECK_BYTES:
            return None
        if isinstance(graph, str):
            graph_id = graph
        else:
            key = _serialized(graph)[1]
            with self._lock:
                graph_id = self._ids.get(key)
                if graph_id is None or self._inline_left.get(key, 0):
                    return None
        refs = tuple((name, ref.handle.id, ref.name) for name, ref in stored)
        form = (graph_id, tuple(wrt or ()), tuple(of or ()), mode, field, refs)
        frame = self._small_frames.get(form)
        if frame is None:
            named = pb.DifferentiateRequest()
            store.fill(named.stored_inputs, dict(stored))
            frame = _remember(self._small_frames, form, (
                pb.DifferentiateRequest(graph_id=graph_id).SerializeToString(),
                pb.DifferentiateRequest(wrt=form[1], of=form[2], mode=WIRE_MODES[mode])
                .SerializeToString(deterministic=True),
                named.SerializeToString(deterministic=True)))
        request_id = str(next(self._request_ids))
        parts[0] = frame[0]
        parts[middle] = frame[1]
        parts.append(_REQUEST_ID_KEY + bytes([len(request_id)]) + request_id.encode())
        parts.append(frame[2])
        stub = next((ref.handle._stub for _, ref in stored if ref.handle._stub is not None),
                    None)
        return b"".join(parts), request_id, form, stub

    def _seeded_differentiate(self, data, request_id, form, stub) -> Result | None:
        """The Result of a _seeded_request, or None after a NOT_FOUND (an unknown graph or
        a lost handle: the general path sends the request again, and puts the graph or
        the handle's tensors again as it does)."""
        try:
            reply = self._call("DifferentiateBytes", data, stub)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None
        return self._small_result(form, request_id, reply)

    def _small_order(self, inputs) -> tuple:
        """The input names in the order of the generated code's deterministic maps."""
        names = tuple(inputs)
        order = self._small_orders.get(names)
        if order is None:
            order = _remember(self._small_orders, names, tuple(sorted(names, key=_map_order)))
        return order

    def _small_differentiate(self, graph, inputs, wrt, of, mode, data, request_id, key,
                             form):
        try:
            return self._small_result(form, request_id, self._call("DifferentiateBytes", data))
        except grpc.RpcError as err:
            request = self._inline_request(err, graph, inputs, wrt, of, mode, request_id,
                                           key)
            if request is None:
                raise
        return result_from_proto(self._call("Differentiate", request))

    def _small_differentiate_async(self, graph, inputs, wrt, of, mode, data, request_id,
                                   key, form) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()

        def not_found(err) -> bool:
            request = self._inline_request(err, graph, inputs, wrt, of, mode, request_id, key)
            if request is None:
                return False
            self._call_async("Differentiate", request, future, result_from_proto)
            return True
        self._call_async("DifferentiateBytes", data, future,
                         lambda reply: self._small_result(form, request_id, reply), not_found)
        return future

    def _small_result(self, form, request_id: str, data: bytes) -> Result:
        """The Result of a small request's reply: read by the layout of its form's
        earlier replies when it has it (_ReplyLayout), else parsed (and its layout
        kept)."""
        layout = self._small_layouts.get(form)
        if layout is not None:
            result = layout.read(data, request_id)
            if result is not None:
                return result
        result = _small_result(data)
        if len(data) <= STORE_CHECK_BYTES:  # (a layout that no longer fits: replaced)
            layout = _ReplyLayout.of(data, result)
            if layout is not None:
                _remember(self._small_layouts, form, layout)
        return result

    def _inline_request(self, err, graph, inputs, wrt, of, mode, request_id, key):
        """After a small request by id failed with `err`: the same request with the graph
        inline if the server did not know the graph (see _by_id), else None."""
        request = self._differentiate_request(inputs, wrt, of, mode, None, None)
        request.message.request_id = request_id
        return request if self._resend_inline(err, key, graph, request) else None

    # --- plumbing ------------------------------------------------------------------

    def _differentiate_request(self, inputs, wrt, of, mode, tangents, cotangents,
                               trace=False, sparsity=None, refs: dict | None = None):
        """The request; `refs` (if given) gets the stored tensors it names, by field."""
        if mode not in WIRE_MODES:
            raise ValueError(f"mode must be one of {sorted(WIRE_MODES)}, not {mode!r}")
        request = pb.DifferentiateRequest(wrt=wrt or (), of=of or (), mode=WIRE_MODES[mode],
                                          request_id=str(next(self._request_ids)),
                                          trace=trace, sparsity=_wire_sparsity(sparsity))
        (inputs, i), (tangents, t), (cotangents, c) = map(store.split,
                                                           (inputs, tangents, cotangents))
        message = TensorMessage(request, {"inputs": inputs, "tangents": tangents,
                                          "cotangents": cotangents})
        for name, named in (("stored_inputs", i), ("stored_tangents", t),
                            ("stored_cotangents", c)):
            store.fill(getattr(request, name), named)
            if refs is not None:
                refs[name] = named
        return message

    def _second_order_request(self, inputs, of, wrt, vectors=None, hessian=False,
                              sparsity=None):
        request = pb.DifferentiateRequest(
            wrt=[wrt] if isinstance(wrt, str) else wrt or (),
            of=[of] if isinstance(of, str) else of or (),
            request_id=str(next(self._request_ids)), sparsity=_wire_sparsity(sparsity))
        request.second_order.SetInParent()  # present even when empty: second order
        request.second_order.hessian = hessian
        (inputs, i), (vectors, v) = store.split(inputs), store.split(vectors)
        store.fill(request.stored_inputs, i)
        store.fill(request.second_order.stored_vectors, v)
        return TensorMessage(request, {"inputs": inputs,
                                       "second_order": {"vectors": vectors}})

    def _register(self, graph, force=False) -> str:
        data, key = _serialized(graph)
        with self._lock:
            known = self._ids.get(key)
        if known is not None and not force:
            return known
        graph_id = self._call("RegisterGraph",
                              pb.RegisterGraphRequest(graph=_graph_proto(graph))).graph_id
        with self._lock:
            self._ids[key] = graph_id
        return graph_id

    def _by_id(self, method: str, graph, request, stub=None):
        """Send by graph id. On NOT_FOUND (a restarted server, or a replica or server
        process that has not seen the graph) send the graph inline instead: the one that
        answers compiles and caches it under the same id. Behind a round-robin balancer
        the retry lands on another replica, so the next INLINE_AFTER_NOT_FOUND calls go
        inline too, which teaches every replica in the rotation."""
        key = self._address_graph(graph, request)
        try:
            return self._call(method, request, stub)
        except grpc.RpcError as err:
            if not self._resend_inline(err, key, graph, request):
                raise
        return self._call(method, request, stub)

    def _by_id_async(self, method: str, graph, request, convert) -> Future:
        """_by_id without waiting: a Future of convert(reply). A request naming stored
        tensors goes to the channel that put them, and when the server no longer holds
        them they are put again (on a thread of its own) and the call made once more,
        as _stored_call does."""
        future: Future = Future()
        future.set_running_or_notify_cancel()
        try:
            key = self._address_graph(graph, request)
        except BaseException as exc:  # e.g. registering the graph failed
            future.set_exception(exc)
            return future
        stub, tried = self._stub_of(request.message), set()

        def again() -> None:
            self._call_async(method, request, future, convert, not_found, stub=stub)

        def put_again(err) -> None:
            try:
                if not self._put_again(request.message):
                    future.set_exception(err)
                    return
            except BaseException as exc:
                future.set_exception(exc)
                return
            again()

        def not_found(err) -> bool:
            if store.stored_gone(err):
                if "store" in tried:
                    return False
                tried.add("store")
                threading.Thread(target=put_again, args=(err,), daemon=True,
                                 name="gradserve-put-again").start()
                return True
            if "graph" in tried or not self._resend_inline(err, key, graph, request):
                return False
            tried.add("graph")
            again()
            return True
        self._call_async(method, request, future, convert, not_found, stub=stub)
        return future

    def _address_graph(self, graph, request) -> str | None:
        """Put the graph's id in `request` (registering the graph if new), or the graph
        itself after a NOT_FOUND (see _by_id); the graph's key when sent by id."""
        if isinstance(graph, str):
            request.message.graph_id = graph
            return None
        key = _serialized(graph)[1]
        with self._lock:
            inline = self._inline_left.get(key, 0)
            if inline:
                self._inline_left[key] = inline - 1
        if inline:
            request.message.graph.CopyFrom(_graph_proto(graph))
            return None
        request.message.graph_id = self._register(graph)
        return key

    def _resend_inline(self, err: grpc.RpcError, key: str | None, graph, request) -> bool:
        """After a call by id failed with `err`: if the server did not know the graph,
        put the graph inline in `request` (and in the next calls') and say so."""
        if (key is None or err.code() != grpc.StatusCode.NOT_FOUND or _residuals_gone(err)
                or store.stored_gone(err)):
            return False
        with self._lock:
            self._inline_left[key] = INLINE_AFTER_NOT_FOUND
        request.message.graph.CopyFrom(_graph_proto(graph))
        return True

    def _retry_delay(self, err: grpc.RpcError, started: float, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt` + 1 of a call begun at `started`
        (time.monotonic) that failed with `err`, or None: give up."""
        if attempt >= self.retries or not _retryable(err, time.monotonic() - started
                                                     < 0.9 * self.timeout):
            return None
        return min(self.backoff * 2 ** attempt, 2.0)

    def _call(self, method: str, request, stub=None):
        """One call of `method` with the retry policy (_retry_delay), each attempt on the
        next channel (or on `stub`'s: the one holding stored tensors)."""
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                return getattr(stub or self._next_stub(), method)(
                    request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                delay = self._retry_delay(err, started, attempt)
                if delay is None:
                    raise _explained(err) from None
            time.sleep(delay)

    def _call_async(self, method: str, request, future: Future, convert, on_error=None,
                    attempt: int = 0, stub=None) -> None:
        """_call without waiting: `future` gets convert(reply), or the error once
        _retry_delay gives up and on_error(err) (if given) did not take it over. A
        retry waits on a timer thread; a call that succeeds uses no thread of ours."""
        started = time.monotonic()

        def done(call) -> None:
            try:
                reply = call.result()
            except grpc.RpcError as err:
                delay = self._retry_delay(err, started, attempt)
                if delay is not None:
                    timer = threading.Timer(delay, self._call_async, (
                        method, request, future, convert, on_error, attempt + 1, stub))
                    timer.daemon = True
                    timer.start()
                elif on_error is None or not on_error(err):
                    future.set_exception(err)
                return
            except BaseException as exc:  # cancelled: the channel was closed
                future.set_exception(exc)
                return
            try:
                future.set_result(convert(reply))
            except BaseException as exc:  # a reply that does not decode
                future.set_exception(exc)
        try:
            call = getattr(stub or self._next_stub(), method).future(
                request, timeout=self.timeout, metadata=self._metadata)
        except BaseException as exc:  # e.g. the client was closed
            future.set_exception(exc)
            return
        call.add_done_callback(done)


def _retryable(err: grpc.RpcError, before_deadline: bool) -> bool:
    """UNAVAILABLE; or CANCELLED that this client did not cause (it never cancels a
    blocking call, and its own deadline reads DEADLINE_EXCEEDED; one that ends near
    the deadline is not retried): grpc reports so a call that a server shutting down
    accepted but never ran. Requests are idempotent."""
    code = err.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.CANCELLED and before_deadline)


def _explained(err: grpc.RpcError) -> grpc.RpcError:
    """grpc's own refusal of a message over a size limit, with what to do about it
    (the limit, its flag, the chunked alternative); any other error unchanged."""
    details = err.details() or ""
    # grpc's text, with "SERVER: " before it when the server refused a request
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not (
            "Received message larger than max" in details
            or "Sent message larger than max" in details):
        return err
    return _StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, (
        f"a message is over a size limit ({details}): the server's is max_message_bytes "
        "(GetServerInfo; `gradserve serve --max-message-bytes N` or "
        "GRADSERVE_MAX_MESSAGE_BYTES), the client's MAX_MESSAGE_BYTES "
        f"({MAX_MESSAGE_BYTES:,}). Send large tensors in chunks instead: "
        "Client.put(tensors) and name them in the request ({**handle, ...}), and take "
        "large derivatives back with differentiate(..., store_results=True) and "
        "Client.get (Client.differentiate does both by itself for inputs it sees)"))


def _ended_idle(err: grpc.RpcError) -> bool:
    """The server ended a stream that sent nothing for its stream_idle_seconds."""
    return (err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            and (err.details() or "").startswith("stream idle"))


def _residuals_gone(err: grpc.RpcError) -> bool:
    """NOT_FOUND for a residuals handle (not for the graph): send the inputs instead."""
    return (err.code() == grpc.StatusCode.NOT_FOUND
            and (err.details() or "").startswith("residuals"))


def _gradient_and_hvp(reply: TensorMessage) -> tuple[dict, dict]:
    return reply.gradient, reply.hvp


def _wire_sparsity(sparsity: str | None) -> int:
    if sparsity is None:
        return pb.SPARSITY_UNSPECIFIED
    if sparsity not in WIRE_SPARSITY:
        raise ValueError(f"sparsity must be one of {sorted(WIRE_SPARSITY)} or None, "
                         f"not {sparsity!r}")
    return WIRE_SPARSITY[sparsity]


_SMALL_KEPT = 256  # entries of each of a Client's small-request caches (then cleared)
_REQUEST_ID_KEY = bytes([pb.DifferentiateRequest.DESCRIPTOR.fields_by_name["request_id"].number
                         << 3 | 2])


def _remember(cache: dict, key, value):
    if len(cache) >= _SMALL_KEPT:
        cache.clear()
    cache[key] = value
    return value


def _map_order(key: str) -> bytes:
    """The order of map keys in protobuf's (upb's) deterministic serialization: by UTF-8
    bytes, a key before its own prefixes. 0xFF is never in UTF-8."""
    return key.encode() + b"\xff"


def _input_head(name: str, array: np.ndarray, field: str = "inputs") -> bytes | None:
    """The bytes of a `field` (inputs, tangents or cotangents) map entry of `array`'s
    name, dtype and shape, up to its data (the entry's last bytes), as the generated code
    writes them; None for a dtype the wire does not carry as it is (the general path
    converts or refuses it)."""
    if array.dtype not in _WIRE_CODES:
        return None
    request = pb.DifferentiateRequest()
    tensor = getattr(request, field)[name]
    tensor.dtype = _WIRE_CODES[array.dtype]
    tensor.shape.extend(array.shape)
    tensor.data = bytes(array.nbytes)
    data = request.SerializeToString()
    return data[:len(data) - array.nbytes]


def _small_result(data: bytes) -> Result:
    """The Result of a DifferentiateResponse's bytes: a small one parsed by the generated
    code, a larger one read by tensor_wire (without copies of its arrays)."""
    if len(data) < SMALL_TENSOR_BYTES:
        return result_from_proto(pb.DifferentiateResponse.FromString(data))
    return result_from_proto(decode(pb.DifferentiateResponse, data))


_REPLY = pb.DifferentiateResponse.DESCRIPTOR.fields_by_name
_REPLY_REQUEST_ID_KEY = bytes([_REPLY["request_id"].number << 3 | 2])
# The fields of a reply a _ReplyLayout reads, by number: "outputs", "jacobian", "tangents",
# "cotangents", or "" (the mode, planner and graph_id: the same in every reply of a form)
_LAYOUT_FIELDS = {_REPLY["outputs"].number: "outputs", _REPLY["jacobian"].number: "jacobian",
                  _REPLY["tangents"].number: "tangents",
                  _REPLY["cotangents"].number: "cotangents",
                  _REPLY["mode"].number: "", _REPLY["planner"].number: "",
                  _REPLY["graph_id"].number: ""}


class _ReplyLayout:
    """A Jacobian, JVP or VJP reply's bytes as a server writes them for every request of
    one form: the same bytes but for its arrays' data and its request_id (the last
    field). A reply that matches them outside those holes is read without parsing: its
    arrays are views of its bytes (dtypes and shapes as in the first reply, whose
    tensors were checked), its mode, planner and graph id the first reply's. Replies
    with bool, empty or sparse blocks have no layout."""

    __slots__ = ("pieces", "arrays", "body", "first")

    def __init__(self, pieces, arrays, body, first: tuple):
        self.pieces = pieces  # (offset, bytes) of the fixed stretches
        self.arrays = arrays  # (kind, key, offset, dtype, count, shape)
        self.body = body  # the bytes before the request_id
        self.first = first  # the first reply's mode, planner and graph id

    @classmethod
    def of(cls, data: bytes, result: Result) -> "_ReplyLayout | None":
        holes, i, end, body = [], 0, len(data), len(data)
        while i < end:
            start = i
            key, i = _varint(data, i)
            number, wire = key >> 3, key & 7
            if wire == 0 and number == _REPLY["mode"].number:
                i = _varint(data, i)[1]
                continue
            length, i = _varint(data, i) if wire == 2 else (None, i)
            if length is None:
                return None
            if number == _REPLY["request_id"].number:
                if i + length != end:
                    return None
                body = start
            elif _LAYOUT_FIELDS.get(number) is None:
                return None
            elif _LAYOUT_FIELDS[number]:
                kind = _LAYOUT_FIELDS[number]
                found = _array_span(data, i, i + length, 3 if kind == "jacobian" else 2)
                if found is None:
                    return None
                names, a, b = found
                name = tuple(names) if kind == "jacobian" else names[0]
                array = getattr(result, kind).get(name)
                if array is None or array.dtype == bool or array.nbytes != b - a or not b - a:
                    return None
                holes.append((kind, name, a, b, array.dtype, array.size, array.shape))
            i += length
        if (len(holes) != len(result.outputs) + len(result.jacobian) + len(result.tangents)
                + len(result.cotangents) or result.trace is not None or result.results_handle):
            return None
        pieces, at = [], 0
        for _, _, a, b, *_ in holes:
            pieces.append((at, data[at:a]))
            at = b
        pieces.append((at, data[at:body]))
        return cls(tuple(pieces), tuple((k, n, a, d, c, s) for k, n, a, _, d, c, s in holes),
                   body, (result.mode, result.planner, result.graph_id))

    def read(self, data: bytes, request_id: str) -> Result | None:
        """The Result of `data` if it is this reply with other arrays and `request_id`."""
        body = self.body
        tail = (_REPLY_REQUEST_ID_KEY + _varint_bytes(len(request_id.encode()))
                + request_id.encode()) if request_id else b""
        if len(data) != body + len(tail) or not data.endswith(tail):
            return None
        for at, piece in self.pieces:
            if not data.startswith(piece, at):
                return None
        found = {"outputs": {}, "jacobian": {}, "tangents": {}, "cotangents": {}}
        for kind, name, at, dtype, count, shape in self.arrays:
            found[kind][name] = np.frombuffer(data, dtype, count, at).reshape(shape)
        mode, planner, graph_id = self.first
        return Result(found["outputs"], found["jacobian"], found["tangents"],
                      found["cotangents"], mode, planner, graph_id, request_id)


def _array_span(data: bytes, i: int, end: int, value: int):
    """In a map entry or a Jacobian block at data[i:end] whose tensor is field `value`:
    (its names, the start and end of its tensor's data); None if it holds anything else
    or its tensor no data."""
    names, span = [], None
    while i < end:
        key, i = _varint(data, i)
        if key & 7 != 2:
            return None
        length, i = _varint(data, i)
        if key >> 3 == value:
            j, stop = i, i + length
            while j < stop:  # the tensor: dtype, shape, data
                k, j = _varint(data, j)
                if k & 7 == 0:
                    j = _varint(data, j)[1]
                    continue
                if k & 7 != 2:
                    return None
                n, j = _varint(data, j)
                if k >> 3 == 3:
                    span = (j, j + n)
                j += n
        elif key >> 3 < value:
            names.append(data[i:i + length].decode())
        else:
            return None
        i += length
    return None if span is None else (names, *span)


def _hessian_blocks(reply: TensorMessage) -> dict:
    return {(b.wrt_a, b.wrt_b): block_value(b, value) for b, value in reply.hessian}


class _TensorStub:
    """GradientService's methods carrying tensors, with gradserve.v1.tensor_wire as their
    serializers: TensorMessage requests in, TensorMessage replies out."""

    def __init__(self, channel: grpc.Channel):
        def method(kind, name, reply_type):
            return getattr(channel, kind)(
                f"/gradserve.v1.GradientService/{name}",
                request_serializer=TensorMessage.SerializeToString,
                response_deserializer=lambda data: decode(reply_type, data,
                                                          small_by_protobuf=True),
                _registered_method=True)
        self.Evaluate = method("unary_unary", "Evaluate", pb.EvaluateResponse)
        self.Differentiate = method("unary_unary", "Differentiate", pb.DifferentiateResponse)
        self.DifferentiateStream = method("stream_stream", "DifferentiateStream",
                                          pb.DifferentiateResponse)
        self.TrainSteps = method("unary_unary", "TrainSteps", pb.TrainStepsResponse)
        # the tensor store's chunks are written and read as bytes (gradserve.v1.chunks)
        self.PutTensors = channel.stream_unary(
            "/gradserve.v1.GradientService/PutTensors", request_serializer=bytes,
            response_deserializer=pb.PutTensorsResponse.FromString, _registered_method=True)
        self.GetTensors = channel.unary_stream(
            "/gradserve.v1.GradientService/GetTensors",
            request_serializer=pb.GetTensorsRequest.SerializeToString,
            response_deserializer=bytes, _registered_method=True)


def _stub(channel: grpc.Channel) -> pb_grpc.GradientServiceStub:
    """The generated stub of `channel`, its methods carrying tensors taken from
    _TensorStub: every method by name on one object, one per channel."""
    stub, tensors = pb_grpc.GradientServiceStub(channel), _TensorStub(channel)
    for name in ("Evaluate", "Differentiate", "DifferentiateStream", "TrainSteps",
                 "PutTensors", "GetTensors"):
        setattr(stub, name, getattr(tensors, name))
    # small requests: bytes both ways, written and read by the Client (_small_request)
    stub.DifferentiateBytes = channel.unary_unary(
        "/gradserve.v1.GradientService/Differentiate", _registered_method=True)
    return stub


def _graph_proto(graph) -> graph_pb2.Graph:
    if isinstance(graph, graph_pb2.Graph):
        return graph
    return graph_pb2.Graph.FromString(_serialized(graph)[0])


def _serialized(graph) -> tuple[bytes, str]:
    if isinstance(graph, GraphBuilder):
        return graph.serialized()
    if isinstance(graph, graph_pb2.Graph):
        data = graph.SerializeToString(deterministic=True)
        return data, hashlib.sha256(data).hexdigest()
    raise TypeError(f"expected a GraphBuilder, a Graph proto or a graph id, not {type(graph)}")


class DifferentiateSession:
    """Many Differentiate steps of one graph over one DifferentiateStream: each
    `differentiate` call sends a request and waits for its reply.

    Deadline, per message: each reply must come within the client's `timeout`
    seconds of its request, else the stream is cancelled (the server stops
    computing) and the call raises DEADLINE_EXCEEDED. The stream itself has no
    deadline, so a session can serve a training run of any length.

    Errors: UNAVAILABLE is retried as unary calls retry it (the client's `retries`
    times, with the same backoff), each time on a new stream; on NOT_FOUND (a server
    that restarted or lost the graph) the request is sent again on a new stream with
    the graph inline; on NOT_FOUND for stored tensors the request's handles are put
    again and it is sent once more (as Client.differentiate does). A request naming
    stored tensors goes over the channel that put them. A stream the server ended for idleness (stream_idle_seconds)
    is replaced by a new one before the next request. Other errors are raised. An
    error ends the stream it happened on; the session's next call opens a new one.
    """

    def __init__(self, client: Client, graph):
        self._client, self._graph = client, graph
        self._stream: _Stream | None = None
        self._inline = False
        self._open()

    def _open(self, stub=None) -> None:
        self._graph_id = self._client._register(self._graph)
        self._stub = stub or self._client._next_stub()
        self._stream = _Stream(self._stub, self._client._metadata)

    def differentiate(self, inputs, *, wrt=None, of=None, mode="auto", tangents=None,
                      cotangents=None, trace=False) -> Result:
        request = self._client._differentiate_request(inputs, wrt, of, mode, tangents,
                                                      cotangents, trace)
        return result_from_proto(self._exchange(request))

    def hvp(self, inputs, vectors, *, of: str | None = None, wrt=None) -> tuple[dict, dict]:
        """As Client.hvp, over this session's stream."""
        return _gradient_and_hvp(self._exchange(
            self._client._second_order_request(inputs, of, wrt, vectors=vectors)))

    def hessian(self, inputs, *, of: str | None = None, wrt=None) -> dict:
        """As Client.hessian, over this session's stream."""
        return _hessian_blocks(self._exchange(
            self._client._second_order_request(inputs, of, wrt, hessian=True)))

    def _exchange(self, request) -> TensorMessage:
        """Send one request and return its reply, retrying as the class says."""
        delay, retried, resent_inline, reopened = self._client.backoff, 0, False, False
        put_again = False
        while True:
            try:
                return self._send(request)
            except grpc.RpcError as err:
                self._end_stream()
                code = err.code()
                if store.stored_gone(err):
                    if put_again or not self._client._put_again(request.message):
                        raise
                    put_again = True
                    continue
                if code == grpc.StatusCode.NOT_FOUND and not resent_inline:
                    resent_inline = self._inline = True
                    continue
                if _ended_idle(err) and not reopened:  # raced the server's idle timeout
                    reopened = True
                    continue
                if code != grpc.StatusCode.UNAVAILABLE or retried >= self._client.retries:
                    raise
            retried += 1
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _send(self, request) -> TensorMessage:
        if self._stream is not None and self._stream.ended():
            self._end_stream()  # the server ended it meanwhile (idle for too long)
        stub = self._client._stub_of(request.message)
        if stub is not None and stub is not self._stub:
            self._end_stream()  # the stored tensors live behind another channel
        if self._stream is None:
            self._open(stub)
        if self._inline:  # the first request of a reopened stream teaches its replica
            request.message.graph.CopyFrom(_graph_proto(self._graph))
        else:
            request.message.graph_id = self._graph_id
        reply = self._stream.exchange(request, self._client.timeout)
        self._inline = False
        return reply

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def close(self) -> None:
        """End the stream: the server finishes it with OK."""
        if self._stream is not None:
            self._stream.close(self._client.timeout)
            self._stream = None

    def __enter__(self) -> "DifferentiateSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StreamError(grpc.RpcError):
    """An error the session raises itself, with the code() and details() of grpc's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Stream:
    """One DifferentiateStream call. A thread moves its replies (and its final error)
    to a queue, so that waiting for a reply can time out."""

    def __init__(self, stub: _TensorStub, metadata):
        self._requests: queue.Queue = queue.Queue()
        self._call = stub.DifferentiateStream(iter(self._requests.get, _STREAM_END),
                                              metadata=metadata)
        self._replies: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="gradserve-stream",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(_STREAM_END)
        except grpc.RpcError as err:
            self._replies.put(err)

    def exchange(self, request, timeout: float) -> TensorMessage:
        """Send `request` and return its reply; DEADLINE_EXCEEDED after `timeout` s."""
        self._requests.put(request)
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.cancel()
            raise _StreamError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no reply on the stream within {timeout:g} s") from None
        if isinstance(reply, grpc.RpcError):
            raise reply
        if reply is _STREAM_END:
            raise _StreamError(grpc.StatusCode.UNAVAILABLE,
                               "the server ended the stream without a reply")
        return reply

    def ended(self) -> bool:
        """The server ended the stream (its status is waiting in the queue)."""
        return not self._reader.is_alive()

    def cancel(self) -> None:
        self._call.cancel()
        self._requests.put(_STREAM_END)  # frees grpc's thread waiting for a request

    def close(self, timeout: float) -> None:
        """No more requests: wait (up to `timeout` s) for the server to end the stream."""
        self._requests.put(_STREAM_END)
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
