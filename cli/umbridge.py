"""`gradserve umbridge`: a graph served as a UM-Bridge model (protocol version 1.0).

UM-Bridge (https://um-bridge-benchmarks.readthedocs.io) is how uncertainty-
quantification and inverse-problem codes (MUQ, PyMC, emcee, QMCPy; clients in C++,
R, Julia, Matlab) call a numerical model over HTTP. A model maps a list of input
vectors to a list of output vectors; here the inputs are the graph's floating inputs
in their order, each flattened in C order, and the outputs its floating outputs,
likewise. Every endpoint is computed by gradserve:

    Evaluate       the outputs
    Gradient       J(outWrt, inWrt)^T sens        one reverse sweep (a VJP)
    ApplyJacobian  J(outWrt, inWrt) vec           one forward sweep (a JVP)
    ApplyHessian   d/d(inWrt1) [d(sens . F_outWrt)/d(inWrt2) . vec]
                   one forward-over-reverse sweep (the service's second order)

and each derivative call logs the planner's decision. Errors are the protocol's:
HTTP 400 with {"error": {"type": ..., "message": ...}} of type InvalidInput (sizes,
indices, malformed requests), ModelNotFound or UnsupportedFeature; a failure on the
gradserve side is HTTP 500.

The HTTP layer is written here with aiohttp (what the umbridge package's own server
uses) rather than umbridge.serve_models, because that function binds every interface
with no host option, cannot bind port 0 and report the port, and answers with a
non-JSON HTTP 500 for requests it does not check (ApplyHessian's sens and vec lengths,
indices that are not integers, malformed JSON), which UM-Bridge clients cannot read.
The model itself is an umbridge.Model (GraphModel), so it can also be passed to
umbridge.serve_models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from gradserve.client import Client
from gradserve.client.extras import MissingExtra
from gradserve.client.onnx import OnnxImportError
from gradserve.v1 import graph_pb2
from gradserve.v1.codec import DTYPES

from .graph import UsageError, read_graph
from .in_process import server_address

PROTOCOL_VERSION = 1.0
DEFAULT_PORT = 4242
UMBRIDGE_EXTRA_HINT = "pip install 'gradserve[umbridge]'"
# Request bodies: JSON numbers take up to ~25 bytes; a request carries every input, plus
# sens and vec. The bound is sized from the model's own sizes (see body_limit).
BYTES_PER_NUMBER = 32
MIN_BODY_BYTES = 1 << 20
ADMITTED_PER_WORKER = 4  # requests read and queued per computing thread
log = logging.getLogger("gradserve.umbridge")

try:
    import umbridge as _umbridge
    _Model = _umbridge.Model
except ModuleNotFoundError:  # the command says what to install; importing stays possible
    _umbridge = None
    _Model = object


class ProtocolError(Exception):
    """An answer in the protocol's error format: {"error": {"type", "message"}}."""

    def __init__(self, kind: str, message: str, status: int = 400):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message}}


def _invalid(message: str) -> ProtocolError:
    return ProtocolError("InvalidInput", message)


# --- the model --------------------------------------------------------------------------

class GraphModel(_Model):
    """A gradserve graph as an umbridge.Model, computed through a gradserve Client.

    `shapes` gives the size of each dynamic (-1) dimension of an input by name. Output
    shapes come from one evaluation at ones when the model is made."""

    def __init__(self, graph: graph_pb2.Graph, client: Client, name: str = "forward",
                 shapes: dict | None = None):
        if _umbridge is not None:
            super().__init__(name)
        self.name = name
        self.graph, self.client = graph, client
        _check_floating(graph)
        self.inputs = _float_inputs(graph, shapes or {})  # [(name, dtype, shape)]
        probe = {n: np.ones(s, d) for n, d, s in self.inputs}
        outputs = client.evaluate(graph, probe)
        self.outputs = [(n, outputs[n].dtype, outputs[n].shape) for n in graph.outputs
                        if outputs[n].dtype.kind == "f"]
        if not self.outputs:
            raise UsageError("the graph has no floating output: a UM-Bridge model returns "
                             "float vectors")
        self.skipped = [n for n in graph.outputs if outputs[n].dtype.kind != "f"]
        self._objectives: dict[int, tuple[graph_pb2.Graph, str, str]] = {}

    # umbridge.Model's interface (lists in, lists out; sizes and indices already checked
    # by the HTTP layer, which also checks them when the model is served elsewhere).

    def get_input_sizes(self, config=None):
        return [_size(s) for _, _, s in self.inputs]

    def get_output_sizes(self, config=None):
        return [_size(s) for _, _, s in self.outputs]

    def supports_evaluate(self):
        return True

    def supports_gradient(self):
        return True

    def supports_apply_jacobian(self):
        return True

    def supports_apply_hessian(self):
        return True

    def __call__(self, parameters, config=None):
        values = self.client.evaluate(self.graph, self._arrays(parameters))
        return [_flat(values[n]) for n, _, _ in self.outputs]

    def gradient(self, out_wrt, in_wrt, parameters, sens, config=None):
        out, (inp, _, _) = self.outputs[out_wrt], self.inputs[in_wrt]
        r = self.client.differentiate(self.graph, self._arrays(parameters), of=[out[0]],
                                      wrt=[inp], cotangents={out[0]: _array(sens, out)})
        self._log("Gradient", f"outWrt={out_wrt} ({out[0]}) inWrt={in_wrt} ({inp})", r.planner)
        return _flat(r.cotangents[inp])

    def apply_jacobian(self, out_wrt, in_wrt, parameters, vec, config=None):
        (out, _, _), inp = self.outputs[out_wrt], self.inputs[in_wrt]
        r = self.client.differentiate(self.graph, self._arrays(parameters), of=[out],
                                      wrt=[inp[0]], tangents={inp[0]: _array(vec, inp)})
        self._log("ApplyJacobian", f"outWrt={out_wrt} ({out}) inWrt={in_wrt} ({inp[0]})",
                  r.planner)
        return _flat(r.tangents[out])

    def apply_hessian(self, out_wrt, in_wrt1, in_wrt2, parameters, sens, vec, config=None):
        """H vec for the objective sens . F_outWrt: the block d2/(d inWrt1 d inWrt2) of
        its Hessian applied to vec (sized like inWrt2), sized like inWrt1."""
        graph, sens_name, _ = self._objective(out_wrt)
        inputs = self._arrays(parameters)
        inputs[sens_name] = _array(sens, self.outputs[out_wrt])
        first, second = self.inputs[in_wrt1], self.inputs[in_wrt2]
        vectors = {second[0]: _array(vec, second)}
        if in_wrt1 != in_wrt2:  # (0, vec) over (inWrt1, inWrt2): the inWrt1 rows are H12 vec
            vectors[first[0]] = np.zeros(first[2], first[1])
        _, hvp, decision = self.client.hvp_with_decision(graph, inputs, vectors)
        self._log("ApplyHessian", f"outWrt={out_wrt} ({self.outputs[out_wrt][0]}) "
                  f"inWrt1={in_wrt1} ({first[0]}) inWrt2={in_wrt2} ({second[0]})", decision)
        return _flat(hvp[first[0]])

    # --- helpers ---

    def _arrays(self, parameters) -> dict:
        return {n: _array(p, (n, d, s)) for p, (n, d, s) in zip(parameters, self.inputs)}

    def _objective(self, out_wrt: int) -> tuple[graph_pb2.Graph, str, str]:
        """The graph with one more input, sens, and the one output sum(sens * F_outWrt)."""
        if out_wrt not in self._objectives:
            out, dtype, shape = self.outputs[out_wrt]
            taken = ({i.name for i in self.graph.inputs} | set(self.graph.constants)
                     | {n.name for n in self.graph.nodes})
            sens, product, objective = (_fresh(f"umbridge_{what}", taken)
                                        for what in ("sens", "sens_product", "objective"))
            graph = graph_pb2.Graph()
            graph.CopyFrom(self.graph)
            graph.inputs.add(name=sens, dtype=_wire_dtype(dtype), shape=shape)
            graph.nodes.add(name=product, op="mul", inputs=[out, sens])
            graph.nodes.add(name=objective, op="sum", inputs=[product])
            del graph.outputs[:]
            graph.outputs.append(objective)
            self._objectives[out_wrt] = (graph, sens, objective)
        return self._objectives[out_wrt]

    def _log(self, endpoint: str, what: str, decision) -> None:
        log.info("%s %s: %s: %s", endpoint, what, decision.mode, decision.reason)


def _float_inputs(graph: graph_pb2.Graph, shapes: dict) -> list:
    known = {i.name for i in graph.inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise UsageError(f"--shape {', '.join(unknown)}: not an input of the graph (inputs: "
                         + ", ".join(known) + ")")
    result = []
    for i in graph.inputs:
        dtype = DTYPES.get(i.dtype)
        if dtype is None or dtype.kind != "f":
            continue
        shape = list(i.shape)
        if i.name in shapes:
            given = shapes[i.name]
            if len(given) != len(shape) or any(d >= 0 and d != g for d, g in zip(shape, given)):
                raise UsageError(f"--shape {i.name}={','.join(map(str, given))} does not fit "
                                 f"the input's declared shape {shape} (-1: any size)")
            shape = list(given)
        if any(d < 0 for d in shape):
            raise UsageError(f"input '{i.name}' has a dynamic dimension (shape {shape}); a "
                             f"UM-Bridge model has fixed sizes: give them with --shape "
                             f"{i.name}=" + ",".join("N" if d < 0 else str(d) for d in shape))
        result.append((i.name, dtype, tuple(shape)))
    if not result:
        raise UsageError("the graph has no floating input: UM-Bridge inputs are float vectors")
    return result


def _check_floating(graph: graph_pb2.Graph) -> None:
    others = [i.name for i in graph.inputs
              if DTYPES.get(i.dtype) is None or DTYPES[i.dtype].kind != "f"]
    if others:
        raise UsageError(f"input {', '.join(repr(n) for n in others)} is not floating: "
                         "UM-Bridge inputs are float vectors; make it a constant of the graph")


def _wire_dtype(dtype: np.dtype) -> int:
    return next(code for code, d in DTYPES.items() if d == dtype)


def _fresh(base: str, taken: set) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _size(shape) -> int:
    return int(math.prod(shape))


def _array(values, spec) -> np.ndarray:
    _, dtype, shape = spec
    return np.asarray(values, dtype=np.float64).astype(dtype, copy=False).reshape(shape)


def _flat(array: np.ndarray) -> list:
    return np.asarray(array, dtype=np.float64).reshape(-1).tolist()


# --- the protocol over HTTP ---------------------------------------------------------------

def body_limit(model: GraphModel) -> int:
    """The largest request body accepted: every input, sens and vec, as JSON numbers."""
    numbers = (sum(model.get_input_sizes()) + max(model.get_input_sizes())
               + max(model.get_output_sizes()))
    return MIN_BODY_BYTES + BYTES_PER_NUMBER * numbers


class Protocol:
    """Checks each request as UM-Bridge 1.0 specifies and calls the model on a thread."""

    def __init__(self, model: GraphModel, workers: int = 4):
        self.model = model
        self.limit = body_limit(model)
        # Requests past this many wait before their bodies are read: memory stays bounded
        # by it times the body limit, however many clients connect.
        self.admitted = asyncio.Semaphore(ADMITTED_PER_WORKER * workers)
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="umbridge")

    def app(self):
        web = _aiohttp_web()
        app = web.Application(client_max_size=self.limit)
        app.router.add_get("/Info", self._info)
        for path, handler in (("/ModelInfo", self._model_info),
                              ("/InputSizes", self._input_sizes),
                              ("/OutputSizes", self._output_sizes),
                              ("/Evaluate", self._evaluate), ("/Gradient", self._gradient),
                              ("/ApplyJacobian", self._apply_jacobian),
                              ("/ApplyHessian", self._apply_hessian)):
            app.router.add_post(path, self._handler(handler))
        for path in ("/TestShMem", "/EvaluateShMem", "/GradientShMem",
                     "/ApplyJacobianShMem", "/ApplyHessianShMem"):
            app.router.add_post(path, self._handler(self._no_shared_memory))
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _handler(self, method):
        web = _aiohttp_web()

        async def handle(request):
            try:
                async with self.admitted:
                    body = await self._body(request)
                    return web.json_response(await method(body))
            except ProtocolError as err:
                return web.json_response(err.body(), status=err.status)
            except Exception as err:  # a bug of ours: still an answer clients can read
                log.exception("%s failed", request.path)
                error = ProtocolError("ModelError", f"{type(err).__name__}: {err}", 500)
                return web.json_response(error.body(), status=500)
        return handle

    async def _body(self, request) -> dict:
        web = _aiohttp_web()
        try:
            body = await request.json(loads=_strict_loads)
        except web.HTTPRequestEntityTooLarge:
            raise _invalid(f"the request body is over this model's limit of {self.limit} "
                           "bytes (sized from its input and output sizes)") from None
        except ValueError as err:
            raise _invalid(f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise _invalid("the request body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str):
            raise _invalid("the request has no model name (key 'name', a string)")
        if name != self.model.name:
            raise ProtocolError("ModelNotFound", f"Model {name} not found! The following are "
                                f"available: {[self.model.name]}.")
        return body

    async def _info(self, request):
        web = _aiohttp_web()
        return web.json_response({"protocolVersion": PROTOCOL_VERSION,
                                  "models": [self.model.name]})

    async def _model_info(self, body):
        m = self.model
        return {"support": {"Evaluate": m.supports_evaluate(),
                            "Gradient": m.supports_gradient(),
                            "ApplyJacobian": m.supports_apply_jacobian(),
                            "ApplyHessian": m.supports_apply_hessian()}}

    async def _input_sizes(self, body):
        return {"inputSizes": self.model.get_input_sizes()}

    async def _output_sizes(self, body):
        return {"outputSizes": self.model.get_output_sizes()}

    async def _no_shared_memory(self, body):
        raise ProtocolError("UnsupportedFeature", "shared-memory transfer is not supported "
                            "by gradserve umbridge: use the HTTP endpoints (Evaluate, "
                            "Gradient, ApplyJacobian, ApplyHessian)")

    async def _evaluate(self, body):
        parameters = self._parameters(body)
        return {"output": await self._run(self.model, parameters)}

    async def _gradient(self, body):
        parameters = self._parameters(body)
        out_wrt = self._index(body, "outWrt", self.model.get_output_sizes(), "outputs")
        in_wrt = self._index(body, "inWrt", self.model.get_input_sizes(), "inputs")
        sens = self._vector(body, "sens", self.model.get_output_sizes()[out_wrt],
                            "Sensitivity vector sens")
        return {"output": await self._run(self.model.gradient, out_wrt, in_wrt, parameters,
                                          sens)}

    async def _apply_jacobian(self, body):
        parameters = self._parameters(body)
        out_wrt = self._index(body, "outWrt", self.model.get_output_sizes(), "outputs")
        in_wrt = self._index(body, "inWrt", self.model.get_input_sizes(), "inputs")
        vec = self._vector(body, "vec", self.model.get_input_sizes()[in_wrt], "Vector vec")
        return {"output": await self._run(self.model.apply_jacobian, out_wrt, in_wrt,
                                          parameters, vec)}

    async def _apply_hessian(self, body):
        parameters = self._parameters(body)
        out_wrt = self._index(body, "outWrt", self.model.get_output_sizes(), "outputs")
        in_wrt1 = self._index(body, "inWrt1", self.model.get_input_sizes(), "inputs")
        in_wrt2 = self._index(body, "inWrt2", self.model.get_input_sizes(), "inputs")
        sens = self._vector(body, "sens", self.model.get_output_sizes()[out_wrt],
                            "Sensitivity vector sens")
        vec = self._vector(body, "vec", self.model.get_input_sizes()[in_wrt2], "Vector vec")
        return {"output": await self._run(self.model.apply_hessian, out_wrt, in_wrt1,
                                          in_wrt2, parameters, sens, vec)}

    # The checks and messages of the umbridge package's own server (umbridge/um.py), plus
    # those it leaves out: types, and ApplyHessian's sens and vec lengths.

    def _parameters(self, body) -> list:
        parameters = body.get("input")
        sizes = self.model.get_input_sizes()
        if not isinstance(parameters, list) or not all(isinstance(p, list) for p in parameters):
            raise _invalid("'input' must be a list of lists of numbers (one per model input)")
        if len(parameters) != len(sizes):
            raise _invalid("Number of input parameters does not match model number of model "
                           f"inputs! Expected {len(sizes)} but got {len(parameters)}.")
        for i, (p, size) in enumerate(zip(parameters, sizes)):
            if len(p) != size:
                raise _invalid(f"Input parameter {i} has invalid length! Expected {size} but "
                               f"got {len(p)}.")
            _check_numbers(p, f"Input parameter {i}")
        return parameters

    def _index(self, body, key: str, sizes: list, what: str) -> int:
        value = body.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(f"'{key}' must be an integer index, not {json.dumps(value)}")
        if value < 0 or value >= len(sizes):
            raise _invalid(f"Invalid {key} index! Expected between 0 and number of {what} "
                           f"minus one, but got {value}")
        return value

    def _vector(self, body, key: str, size: int, what: str) -> list:
        value = body.get(key)
        if not isinstance(value, list):
            raise _invalid(f"'{key}' must be a list of numbers")
        if len(value) != size:
            raise _invalid(f"{what} has invalid length! Expected {size} but got {len(value)}.")
        _check_numbers(value, what)
        return value

    async def _run(self, function, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, function, *args)
        except grpc.RpcError as err:
            raise _from_rpc(err) from None


def _check_numbers(values: list, what: str) -> None:
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _invalid(f"{what} entry {j} is not a number: {json.dumps(v)}")


def _strict_loads(text: str):
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _from_rpc(err: grpc.RpcError) -> ProtocolError:
    code, details = err.code(), err.details()
    message = f"gradserve: {code.name}: {details}"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.OUT_OF_RANGE):
        return _invalid(message)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ProtocolError("UnsupportedFeature", message)
    # A model-side failure: the protocol's 500; it names no type for it.
    return ProtocolError("ModelError", message, status=500)


def _aiohttp_web():
    try:
        from aiohttp import web
    except ModuleNotFoundError as err:
        raise MissingExtra(f"gradserve umbridge needs aiohttp, which is not installed: "
                           f"{UMBRIDGE_EXTRA_HINT}", name="aiohttp") from err
    return web


# --- the command ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("graph", metavar="GRAPH", help="a .json or binary (.pb) graph file, an ONNX model "
        "(.onnx, initializers as constants) or a .py file defining `graph` or `build()`")
    add("--host", default="127.0.0.1",
        help="address to bind; 0.0.0.0 for all interfaces, e.g. in a container; the "
             "protocol has no authentication (default: %(default)s)")
    add("--port", type=int, default=DEFAULT_PORT,
        help="HTTP port, 0 picks a free one (default: %(default)s, UM-Bridge's usual port)")
    add("--name", default="forward",
        help="the model's name, which clients ask for (default: %(default)s, the name "
             "UM-Bridge's examples use)")
    add("--server", metavar="HOST:PORT",
        help="a running gradserve server to compute on (default: start one in-process on a "
             "free port)")
    add("--shape", action="append", default=[], metavar="INPUT=D0,D1,...",
        help="the size of an input with dynamic dimensions (-1), e.g. x=1,3,32,32: UM-Bridge "
             "sizes are fixed; may be repeated")
    add("--workers", type=int, default=4,
        help="requests computed at once (threads calling gradserve); 4 times as many are "
             "read and queued, more wait unread (default: %(default)s)")
    add("--timeout", type=float, default=30.0, metavar="SECONDS",
        help="deadline of each call to gradserve, retries included; a call past it is an "
             "HTTP 500 (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The in-process server's line per gRPC call would bury the planner's decisions.
    logging.getLogger("gradserve.requests").setLevel(logging.WARNING)
    try:
        if _umbridge is None:
            raise MissingExtra("gradserve umbridge needs the umbridge package, which is not "
                               f"installed: {UMBRIDGE_EXTRA_HINT}", name="umbridge")
        _aiohttp_web()
        graph = read_graph(Path(args.graph))
        shapes = _shapes(args.shape)
        if args.workers < 1 or args.timeout <= 0:
            raise UsageError("--workers must be at least 1 and --timeout above 0")
        with server_address(args.server) as address, \
                Client(address, timeout=args.timeout) as client:
            model = GraphModel(graph, client, args.name, shapes)
            return asyncio.run(_serve(Protocol(model, args.workers), model, args, address))
    except (UsageError, OSError, OnnxImportError, MissingExtra) as err:
        print(f"gradserve umbridge: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"gradserve umbridge: error from the server: {err.code().name}: "
              f"{err.details()}", file=sys.stderr)
        return 1


def _shapes(specs: list[str]) -> dict:
    """--shape INPUT=D0,D1,... flags as {input: [sizes]}."""
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            sizes = [int(d) for d in dims.split(",")]
        except ValueError:
            sizes = None
        if not name.strip() or sizes is None or any(d < 0 for d in sizes):
            raise UsageError(f"--shape {spec!r}: expected INPUT=D0,D1,... with sizes >= 0")
        shapes[name.strip()] = sizes
    return shapes


async def _serve(protocol: Protocol, model: GraphModel, args, address: str) -> int:
    web = _aiohttp_web()
    runner = web.AppRunner(protocol.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        where = args.server or f"an in-process server on {address}"
        describe = lambda items: ", ".join(f"{n} {list(s)} {d.name}"  # noqa: E731
                                           for n, d, s in items)
        log.info("inputs %s; outputs %s%s", describe(model.inputs), describe(model.outputs),
                 f" (not served, not floating: {', '.join(model.skipped)})"
                 if model.skipped else "")
        log.info("gradserve umbridge: model '%s' at http://%s:%d, computed by %s",
                 model.name, host, port, where)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("gradserve umbridge: stopping")
        return 0
    finally:
        await runner.cleanup()
