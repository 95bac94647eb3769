"""compile(graph) -> Plan: a validated graph, ready to evaluate and differentiate.

Compiling does all the analysis once: validation, op lookup, attribute binding,
dead-node pruning, each value's last use, and which values the reverse sweep
needs. Running a Plan is then a loop over prepared steps.

Values live in a list of slots (inputs, constants, then nodes). Seeds carry a
leading axis of k directions, so a whole Jacobian is one sweep.
"""

from __future__ import annotations

from functools import partial
from math import prod
from typing import Mapping, NamedTuple

import numpy as np

from .errors import DifferentiationError, InputError, ResourceLimitError
from .ir import FLOAT_DTYPES, Graph
from .planner import ModeDecision, plan_mode
from .shapes import MAX_SPAN, fill_seed, fmt_shape, span
from .sweeps import Step, check_points, forward_sweep, reverse_sweep, values_sweep
from .validate import infer_shapes, validate

_SPECIALIZATION_CACHE = 64  # distinct input-shape signatures remembered per plan
_CACHED_SEED_BYTES = 1 << 20
_HEAVY_ELEMENTS = 1 << 16  # identity seeds larger than this are rebuilt per call


class JVPResult(NamedTuple):
    outputs: dict
    tangents: dict  # output name -> tangent


class VJPResult(NamedTuple):
    outputs: dict
    cotangents: dict  # input name -> cotangent


class _JacobianSetup(NamedTuple):
    wrt: tuple
    of: tuple
    seed_names: tuple  # the wrt inputs (forward) or the of outputs (reverse)
    offsets: dict  # seed name -> its first direction
    directions: int
    seeds: dict  # slot -> read-only identity seed, filled on first use when small
    decision: ModeDecision
    pieces: list  # (key, result slot, first row, stop row, 2-D shape, block shape, transpose, dtype)
    result_bytes: int
    seed_bytes: int
    largest_block: int  # elements


class JacobianResult(NamedTuple):
    outputs: dict
    jacobian: dict  # (of, wrt) -> array shaped of.shape + wrt.shape
    mode: str
    decision: ModeDecision


def compile(graph: Graph) -> "Plan":
    """Validate `graph` (raising the engine's errors) and prepare it to run."""
    return Plan(graph)


class Plan:
    def __init__(self, graph: Graph):
        checked = validate(graph)
        self.graph = graph
        self.shapes = checked.shapes  # static; None marks a run-time dimension
        self.dtypes = checked.dtypes
        self.input_names = tuple(i.name for i in graph.inputs)
        self.output_names = tuple(graph.outputs)
        self.float_inputs = tuple(n for n in self.input_names if self.dtypes[n] in FLOAT_DTYPES)
        self.float_outputs = tuple(n for n in self.output_names
                                   if self.dtypes[n] in FLOAT_DTYPES)
        self._input_set = frozenset(self.input_names)
        self._np_dtypes = {name: np.dtype(d) for name, d in self.dtypes.items()}
        self.static = all(d is not None for n in self.input_names for d in self.shapes[n])

        names = list(self.input_names) + list(graph.constants)
        self.slot = {name: i for i, name in enumerate(names)}
        for node in graph.nodes:
            self.slot[node.name] = len(self.slot)
        self._n_slots = len(self.slot)
        self._template = [None] * self._n_slots
        for name, value in graph.constants.items():
            self._template[self.slot[name]] = value

        live = self._live_nodes(graph)
        self._nodes = [(node, op, attrs) for node, op, attrs, keep
                       in zip(graph.nodes, checked.ops, checked.attrs, live) if keep]
        self._build_steps()
        self._specializations: dict = {}
        self._jacobian_setups: dict = {}
        self._activity: dict = {}

    # --- compile-time analysis ------------------------------------------------

    def _live_nodes(self, graph: Graph) -> list[bool]:
        """Nodes some output depends on (one backward pass, no recursion)."""
        needed = set(graph.outputs)
        live = [False] * len(graph.nodes)
        for j in range(len(graph.nodes) - 1, -1, -1):
            node = graph.nodes[j]
            if node.name in needed:
                live[j] = True
                needed.update(node.inputs)
        return live

    def _build_steps(self):
        slot = self.slot
        steps = []
        last_use = {}
        needed_backward = set()
        for j, (node, op, attrs) in enumerate(self._nodes):
            ins = tuple(slot[r] for r in node.inputs)
            out = slot[node.name]
            bind = (lambda f: partial(f, **attrs)) if attrs else (lambda f: f)
            steps.append(Step(node.name, op.name, bind(op.eval), bind(op.jvp), bind(op.vjp),
                              ins, out))
            for i in ins:
                last_use[i] = j
            if "x" in op.saves:
                needed_backward.update(ins)
            if "ans" in op.saves:
                needed_backward.add(out)
        keep = {slot[o] for o in self.output_names}
        first_node_slot = len(self.input_names) + len(self.graph.constants)
        free = [[] for _ in steps]
        drop = [[] for _ in steps]  # freed during the reverse sweep's forward pass
        for s, j in last_use.items():
            if s in keep or s < first_node_slot:
                continue
            free[j].append(s)
            if s not in needed_backward:
                drop[j].append(s)
        self._steps = [st._replace(free=tuple(f), drop=tuple(d))
                       for st, f, d in zip(steps, free, drop)]
        # A cancelled call is noticed before each heavy op (matmul, or a value of 64K+
        # elements or of a size known only at run time) and at least every 64 ops.
        self._points = check_points([
            op.name == "matmul" or any(d is None for d in self.shapes[node.name])
            or prod(self.shapes[node.name]) >= _HEAVY_ELEMENTS
            for node, op, _ in self._nodes])

    # --- binding run-time values --------------------------------------------------

    def _bind(self, inputs: Mapping[str, np.ndarray]):
        """Check the inputs against the graph; return the slot list and every value's shape."""
        vals = self._template[:]
        if len(inputs) != len(self.input_names) or not self._input_set.issuperset(inputs):
            self._unknown_inputs(inputs)
        for i, name in enumerate(self.input_names):
            value = inputs.get(name)
            if value is None:
                raise InputError("input is missing", node=name, field="inputs")
            if type(value) is not np.ndarray:
                value = np.asarray(value)
            if value.dtype != self._np_dtypes[name]:
                raise InputError(f"expected dtype {self.dtypes[name]}, got {value.dtype}",
                                 node=name, field="dtype")
            declared = self.shapes[name]
            if value.shape != declared and not _fits(value.shape, declared):
                raise InputError(f"expected shape {fmt_shape(declared)}, got "
                                 f"{fmt_shape(value.shape)}", node=name, field="shape")
            vals[i] = value
        if self.static:
            return vals, self.shapes, None
        signature = tuple(v.shape for v in vals[:len(self.input_names)])
        return vals, self._specialize(signature), signature

    def _unknown_inputs(self, inputs):
        for name in inputs:
            if name not in self._input_set:
                raise InputError("is not an input of the graph (inputs: "
                                 + ", ".join(self.input_names) + ")", node=name,
                                 field="inputs")

    def _specialize(self, signature):
        """Every value's concrete shape for these input shapes (cached per signature)."""
        shapes = self._specializations.get(signature)
        if shapes is None:
            shapes = dict(zip(self.input_names, signature))
            for name, value in self.graph.constants.items():
                shapes[name] = value.shape
            infer_shapes([n.name for n, _, _ in self._nodes], [op for _, op, _ in self._nodes],
                         [a for _, _, a in self._nodes], [n.inputs for n, _, _ in self._nodes],
                         shapes)
            if len(self._specializations) >= _SPECIALIZATION_CACHE:
                self._specializations.pop(next(iter(self._specializations)), None)
            self._specializations[signature] = shapes
        return shapes

    def estimate_bytes(self, shapes, directions: int = 0) -> int:
        """Memory the node values and their seeds may take at these shapes."""
        total = 0
        for node, _, _ in self._nodes:
            total += prod(shapes[node.name]) * self._np_dtypes[node.name].itemsize
        return total * (1 + directions)

    def _check_memory(self, shapes, directions, max_bytes, extra=0):
        if max_bytes is None:
            return
        need = self.estimate_bytes(shapes, directions) + extra
        if need > max_bytes:
            raise ResourceLimitError(
                f"the request needs about {need:,} bytes of intermediates "
                f"({directions} seed directions), over the limit of {max_bytes:,}",
                field="inputs")

    def _names(self, names, allowed, default, what, field):
        if names is None:
            return default
        names = tuple(names)
        for name in names:
            if name not in allowed:
                if what == "input" and name in self.slot:
                    why = "is not a graph input (only inputs can be differentiated with respect to)"
                elif what == "input":
                    why = "is not a graph input"
                else:
                    why = "is not a graph output"
                raise DifferentiationError(why, node=name, field=field)
            if self.dtypes[name] not in FLOAT_DTYPES:
                raise DifferentiationError(f"has dtype {self.dtypes[name]}; only floating "
                                           f"{what}s have derivatives", node=name, field=field)
        return names

    def _wrt(self, wrt):
        return self._names(wrt, self.input_names, self.float_inputs, "input", "wrt")

    def _of(self, of):
        return self._names(of, self.output_names, self.float_outputs, "output", "of")

    def _seeds(self, seeds, names, shapes, field):
        """Seeds shaped like their value, or with a leading axis of k directions."""
        out, ks, batched = {}, set(), set()
        for name, seed in seeds.items():
            shape, dtype = tuple(shapes[name]), self._np_dtypes[name]
            seed = np.asarray(seed)
            if seed.dtype != dtype:
                raise InputError(f"seed dtype {seed.dtype} does not match the value's "
                                 f"{dtype}", node=name, field=field)
            if seed.shape == shape:
                seed, is_batched = seed[None], False
            elif seed.shape[1:] == shape:
                is_batched = True
            else:
                raise InputError(f"seed shape {fmt_shape(seed.shape)} is neither "
                                 f"{fmt_shape(shape)} nor (k,) + {fmt_shape(shape)}",
                                 node=name, field=field)
            out[self.slot[name]] = seed
            ks.add(seed.shape[0])
            batched.add(is_batched)
        if len(batched) > 1 or len(ks) > 1:
            raise InputError("seeds must all be batched with the same number of directions, "
                             "or all unbatched", field=field)
        return out, (ks.pop() if ks else 1), (batched.pop() if batched else False)

    def _needs(self, wrt):
        """Per step, the input positions that depend on a `wrt` input (cached per wrt)."""
        needs = self._activity.get(wrt)
        if needs is None:
            active = [False] * self._n_slots
            for name in wrt:
                active[self.slot[name]] = True
            needs = []
            for st in self._steps:
                positions = tuple(p for p, i in enumerate(st.ins) if active[i])
                active[st.out] = bool(positions)
                needs.append(positions)
            self._activity[wrt] = needs
        return needs

    def _outputs(self, vals):
        return {name: vals[self.slot[name]] for name in self.output_names}

    # --- public API --------------------------------------------------------------

    # Every method takes, by keyword: `max_bytes`, a limit on the estimated memory of
    # values and seeds (ResourceLimitError before anything runs), and `check`, a
    # callable run between chunks of ops that may raise to stop the computation.

    def evaluate(self, inputs, *, max_bytes=None, check=None) -> dict:
        """Output values: name -> array."""
        vals, shapes, _ = self._bind(inputs)
        self._check_memory(shapes, 0, max_bytes)
        values_sweep(self._steps, vals, check, self._points)
        return self._outputs(vals)

    def jvp(self, inputs, tangents, *, max_bytes=None, check=None) -> JVPResult:
        """Forward mode: push input tangents to every output in the values' sweep."""
        vals, shapes, _ = self._bind(inputs)
        self._names(tuple(tangents), self.input_names, (), "input", "tangents")
        seeds, k, batched = self._seeds(tangents, self.input_names, shapes, "tangents")
        self._check_memory(shapes, k, max_bytes)
        tans = [None] * self._n_slots
        for s, t in seeds.items():
            tans[s] = t
        forward_sweep(self._steps, vals, tans, check, self._points)
        out = {}
        for name in self.output_names:
            t = tans[self.slot[name]]
            shape = tuple(shapes[name])
            if t is None:
                t = np.zeros((k,) + shape, self.dtypes[name])
            t = fill_seed(t, shape)
            out[name] = t if batched else t[0]
        return JVPResult(self._outputs(vals), out)

    def vjp(self, inputs, cotangents, wrt=None, *, max_bytes=None, check=None) -> VJPResult:
        """Reverse mode: pull output cotangents back to the `wrt` inputs."""
        vals, shapes, _ = self._bind(inputs)
        self._names(tuple(cotangents), self.output_names, (), "output", "cotangents")
        wrt = self._wrt(wrt)
        seeds, k, batched = self._seeds(cotangents, self.output_names, shapes, "cotangents")
        self._check_memory(shapes, k, max_bytes)
        cots = reverse_sweep(self._steps, vals, seeds, self._needs(wrt), check, self._points)
        out = {}
        for name in wrt:
            g = cots[self.slot[name]]
            shape = tuple(shapes[name])
            g = np.zeros((k,) + shape, self.dtypes[name]) if g is None else fill_seed(g, shape)
            out[name] = g if batched else g[0]
        return VJPResult(self._outputs(vals), out)

    def jacobian(self, inputs, wrt=None, of=None, mode="auto", *, max_bytes=None,
                 max_block_elements=None, ratio=None, check=None) -> JacobianResult:
        """d(of)/d(wrt) blocks shaped of.shape + wrt.shape, by the mode the planner picks.

        `max_block_elements` refuses (ResourceLimitError) a Jacobian with a larger
        block, before any work; `max_bytes` counts the identity seeds and the result.
        """
        vals, shapes, signature = self._bind(inputs)
        key = (signature, None if wrt is None else tuple(wrt), None if of is None else tuple(of),
               mode, ratio)
        setup = self._jacobian_setups.get(key)
        if setup is None:
            setup = self._jacobian_setup(shapes, *key[1:])
            if len(self._jacobian_setups) >= _SPECIALIZATION_CACHE:
                self._jacobian_setups.pop(next(iter(self._jacobian_setups)), None)
            self._jacobian_setups[key] = setup
        if max_block_elements is not None and setup.largest_block > max_block_elements:
            raise ResourceLimitError(
                f"a Jacobian block would have {setup.largest_block:,} elements, over the "
                f"limit of {max_block_elements:,}: ask for fewer `of`/`wrt` or use JVPs/VJPs",
                field="of")
        if max_bytes is not None:
            d = setup.decision
            self._check_memory(shapes, d.n if d.mode == "forward" else d.m, max_bytes,
                               extra=setup.result_bytes + setup.seed_bytes)
        seeds = setup.seeds or self._identity_seeds(setup, shapes)
        return self._jacobian_blocks(vals, setup, seeds, check)

    def _jacobian_setup(self, shapes, wrt, of, mode, ratio) -> "_JacobianSetup":
        """Everything about a Jacobian that depends on shapes only: the mode, the
        identity seeds' layout and where each block sits in the swept result."""
        if mode not in ("auto", "forward", "reverse"):
            raise DifferentiationError(f"unknown mode {mode!r} (auto, forward or reverse)",
                                       field="mode")
        wrt, of = self._wrt(wrt), self._of(of)
        sizes = {name: prod(shapes[name]) for name in wrt + of}
        n = sum(sizes[w] for w in wrt)
        m = sum(sizes[o] for o in of)
        kwargs = {} if ratio is None else {"ratio": ratio}
        decision = plan_mode(n, m, forced=None if mode == "auto" else mode, **kwargs)
        forward = decision.mode == "forward"
        seed_names, total = (wrt, n) if forward else (of, m)
        offsets, at = {}, 0
        for name in seed_names:
            offsets[name] = at
            at += sizes[name]
        seed_bytes = sum(total * sizes[x] * self._np_dtypes[x].itemsize for x in seed_names)
        itemsize = max((self._np_dtypes[x].itemsize for x in wrt + of), default=8)
        # Forward mode gives d(of)/d(all wrt) per output (directions first), reverse
        # mode d(all of)/d(wrt) per input.
        pieces = []
        for o in of:
            for w in wrt:
                shape = tuple(shapes[o]) + tuple(shapes[w])
                if forward:
                    src, at, size, flat = self.slot[o], offsets[w], sizes[w], (n, sizes[o])
                else:
                    src, at, size, flat = self.slot[w], offsets[o], sizes[o], (m, sizes[w])
                pieces.append(((o, w), src, at, at + size, flat, shape, forward,
                               self._np_dtypes[o]))
        largest = max((sizes[o] * sizes[w] for o in of for w in wrt), default=0)
        for o in of:
            for w in wrt:
                if span(tuple(shapes[o]) + tuple(shapes[w])) > MAX_SPAN:
                    raise ResourceLimitError(
                        f"the Jacobian block d{o}/d{w} of shape "
                        f"{fmt_shape(tuple(shapes[o]) + tuple(shapes[w]))} is too large for an "
                        "array", field="of")
        return _JacobianSetup(wrt, of, seed_names, offsets, total, {}, decision, pieces,
                              n * m * itemsize, seed_bytes, largest)

    def _identity_seeds(self, setup, shapes) -> dict:
        """The identity, split into one seed per name, with a leading axis of directions.
        Small ones are kept with the setup (read-only, shared by later calls)."""
        seeds = {}
        for name in setup.seed_names:
            at, dtype, shape = setup.offsets[name], self._np_dtypes[name], tuple(shapes[name])
            size = prod(shape)
            block = np.zeros((setup.directions, size), dtype)
            block[at:at + size] = np.eye(size, dtype=dtype)
            block.setflags(write=False)
            seeds[self.slot[name]] = block.reshape((setup.directions,) + shape)
        if setup.seed_bytes <= _CACHED_SEED_BYTES:
            setup.seeds.update(seeds)
        return seeds

    def _jacobian_blocks(self, vals, setup, seeds, check) -> JacobianResult:
        decision = setup.decision
        if decision.mode == "forward":
            res = [None] * self._n_slots
            for s, t in seeds.items():
                res[s] = t
            forward_sweep(self._steps, vals, res, check, self._points)
        else:
            res = reverse_sweep(self._steps, vals, seeds, self._needs(setup.wrt), check,
                                self._points)
        blocks = {}
        for key, src, at, stop, flat, shape, transpose, dtype in setup.pieces:
            r = res[src]
            if r is None:
                blocks[key] = np.zeros(shape, dtype)
                continue
            r = r.reshape(flat)
            if at or stop != flat[0]:
                r = r[at:stop]
            blocks[key] = (r.T if transpose else r).reshape(shape)
        return JacobianResult(self._outputs(vals), blocks, decision.mode, decision)


def _fits(shape, declared) -> bool:
    return len(shape) == len(declared) and all(
        d is None or d == s for s, d in zip(shape, declared))
