"""The op table's row type, the table itself, and what the rows of every group share.

Rule signatures (one vocabulary everywhere):

    shape(shapes, dtypes, **attrs) -> shape          static shapes, None = unknown dim
    eval(*x, **attrs) -> ans
    jvp(t, x, ans, **attrs) -> tangent of ans         t: one tangent or None per input
    vjp(i, g, x, ans, **attrs) -> cotangent of x[i]   called only for inputs that need one
    curvature(i, g, x, ans, t, t_ans, **attrs) -> (k,) + x[i].shape, or None
    joint(i, g, gdot, x, ans, t, t_ans, **attrs) -> (g_i, ġ_i), or None

Seeds are batched: a tangent or cotangent of a value of shape S has shape
(k,) + S, so a whole Jacobian is one vectorized sweep. Attributes reach the
rules already checked and normalized (axes non-negative, defaults filled in).
`saves` says which values the vjp reads: "x" (the inputs), "ans" (the output);
values no vjp reads are dropped during a reverse sweep (only their shapes stay).

Only floating values have derivatives. A jvp returns None when its result has
none (comparisons, a cast to an integer or bool); a vjp returns None for an
input that has none (indices, a condition, an integer cast to a float). Integer
and bool values therefore never carry a tangent or a cotangent.

Second order (forward-over-reverse, engine/second.py) differentiates the reverse
sweep along k tangent directions. For a step with inputs x, output ans, cotangent
g and the tangent ġ of that cotangent, the tangent of the cotangent pulled into
input i is

    ġ_i = vjp(i, ġ, x, ans) + curvature(i, g, x, ans, t, t_ans)

where `curvature` is the derivative of vjp(i, g, x, ans) with respect to x (and
ans) along their tangents, g held fixed: g carries one direction ((1,) + ans.shape),
t one tangent per input ((k,) + x[j].shape, None where none reaches it) and t_ans
the output's tangent ((k,) + ans.shape or None); None means no term. Every op with
a derivative states its curvature: ZERO where the vjp is locally constant in x
(linear ops, and piecewise-linear ones away from their kinks: their second
derivative is 0 almost everywhere, as in PyTorch), otherwise a rule; `row` refuses
a row that says nothing. `joint`, optional, computes g_i and ġ_i together where
that is cheaper than the vjp on the stacked seed plus the curvature term (None
from it: fall back to them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from ..errors import DTypeError, GraphError, RuleError
from ..ir import FLOAT_DTYPES
from ..shapes import broadcast_shapes, fill_seed, normalize_axis

REQUIRED = object()
ZERO = None  # curvature: the vjp is locally constant in x, no second-order term
UNSTATED = object()  # curvature not given: refused by `row` for an op with a derivative


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "int", "ints", "bool", "float", "string"
    default: Any = REQUIRED
    description: str = ""


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None  # None: one or more inputs
    shape: Callable
    eval: Callable
    jvp: Callable
    vjp: Callable
    attrs: tuple[AttrSpec, ...] = ()
    saves: frozenset = frozenset({"x", "ans"})
    float_only: bool = True
    normalize: Callable | None = None  # (attrs, shapes) -> attrs, raises RuleError
    description: str = ""
    elementwise: bool = False  # each output element depends on the same element of each input
    # (names, dtypes, **attrs) -> the result's dtype, raising RuleError; None: the operands
    # share one numeric dtype (floating if float_only), which the result keeps.
    dtype: Callable | None = None
    # (shapes, **attrs) -> elements of scratch memory the op allocates beyond its output,
    # per seed direction (the values-only pass counts as one direction); None: none to speak
    # of. For memory estimates made before anything runs.
    scratch: Callable | None = None
    # (shapes, out_shape, **attrs) -> floating-point operations of eval (a jvp or vjp
    # costs about as much per direction); None: about one per element read or written.
    # For the work bound checked before anything runs.
    flops: Callable | None = None
    node_attr: bool = False  # the rules also get the node's name as `node` (run-time errors)
    # (mode, shapes, out_shape, dtype, **attrs) -> costs.OpCost: memory beyond the op's
    # inputs and output, FLOPs and Python loop passes in each of costs.MODES, per seed
    # direction (the whole eval for "values"); None: from `scratch` and `flops` above
    # (costs.default_cost). tests/engine/test_costs.py proves it against the kernels.
    cost: Callable | None = None
    # Second order (see the module docstring): the vjp's derivative along the tangents
    # (ZERO: none), and optionally g_i and ġ_i computed together.
    curvature: Callable | None = UNSTATED
    joint: Callable | None = None
    # Sparsity (engine/sparsity.py): (shapes, out_shape, values, op_eval, **attrs) -> per
    # input its local dependency: "same" (element i reads element i), (out_index,
    # in_index) arrays, or None (no derivative through it); values holds the constant
    # inputs (None elsewhere), op_eval this row's eval. None: every element of the result
    # depends on every element of every input. `bilinear`: the second derivative couples
    # only different inputs (mul, matmul, conv), for the Hessian's pattern.
    pattern: Callable | None = None
    bilinear: bool = False
    # f(a, b) == f(b, a): a node reading one value twice (x * x) pulls the same cotangent
    # into both positions, so the reverse sweep computes it once and doubles it.
    symmetric: bool = False
    # A variadic op whose node may read one value many times (concat(x, x, ..., x)):
    # (refs, shapes, **attrs) -> what its rules get as the attribute `refs`, where refs
    # holds, per reference, the position of its value among the distinct ones and shapes
    # their static shapes (also called for COMPACT_FROM inputs or more, none repeated).
    # The plan (compact_references) then hands every rule each distinct value once, so a
    # call's work follows the values and the elements produced, not the count of
    # references. None: the node reads its references as listed.
    references: Callable | None = None


OPS: dict[str, OpDef] = {}


def row(op: OpDef) -> OpDef:
    """Add `op` to the table. An op with a derivative must state its curvature (ZERO or
    a rule); one without (no_cotangent) has none."""
    if op.curvature is UNSTATED:
        if op.vjp is not no_cotangent:
            raise TypeError(f"op {op.name!r} has a vjp but states no curvature (ZERO or a "
                            "rule)")
        op = replace(op, curvature=ZERO)
    OPS[op.name] = op
    return op


def shared_dtype(names, dtypes, float_only=False, bool_ok=False) -> str:
    """The one dtype all operands share: float_only refuses integers and bool, and bool
    is refused unless bool_ok (arithmetic has no meaning for it)."""
    for name, dtype in zip(names[1:], dtypes[1:]):
        if dtype != dtypes[0]:
            raise RuleError(f"dtype mismatch: '{names[0]}' is {dtypes[0]}, "
                            f"'{name}' is {dtype}", "inputs", DTypeError)
    if float_only and dtypes[0] not in FLOAT_DTYPES:
        raise RuleError(f"needs floating inputs; '{names[0]}' is {dtypes[0]}", "inputs",
                        DTypeError)
    if dtypes[0] == "bool" and not bool_ok:
        raise RuleError(f"needs numeric inputs; '{names[0]}' is bool", "inputs", DTypeError)
    return dtypes[0]


def any_dtype(names, dtypes, **attrs):
    """Ops that move elements without arithmetic take any dtype, bool included."""
    return shared_dtype(names, dtypes, bool_ok=True)


def no_tangent(t, x, ans, **attrs):
    return None


def no_cotangent(i, g, x, ans, **attrs):
    return None


def broadcast_rule(shapes, dtypes):
    return broadcast_shapes(*shapes)


def jvp_sum(a, b, shape):
    """a + b for tangent terms that may be None, filled to (k,) + shape."""
    r = a if b is None else b if a is None else a + b
    return r if r.shape[1:] == shape else fill_seed(r, shape)


def shift(axes):
    """Axes of a value as axes of its seeds (the direction axis in front)."""
    return tuple(a + 1 for a in axes)


def norm_axis(attrs, shapes):
    return dict(attrs, axis=normalize_axis(attrs["axis"], len(shapes[0]), "attrs.axis"))


# --- attribute checking --------------------------------------------------------

_ATTR_CHECKS = {
    "int": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)),
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "float": lambda v: isinstance(v, (int, float, np.integer, np.floating))
    and not isinstance(v, (bool, np.bool_)),
    "ints": lambda v: isinstance(v, (list, tuple, np.ndarray)) and all(
        _ATTR_CHECKS["int"](e) for e in v),
    "string": lambda v: isinstance(v, str),
}


def _convert(spec: AttrSpec, value):
    if spec.type == "ints":
        return tuple(int(e) for e in value)
    if spec.type == "int":
        return int(value)
    if spec.type == "bool":
        return bool(value)
    if spec.type == "string":
        return str(value)
    return float(value)


def check_attrs(op: OpDef, attrs, shapes) -> dict:
    """Known names, right types, defaults filled in, then the op's own normalization."""
    specs = {s.name: s for s in op.attrs}
    for name in attrs:
        if name not in specs:
            expected = ", ".join(specs) or "none"
            raise RuleError(f"unknown attribute '{name}' (expected: {expected})",
                            f"attrs.{name}", GraphError)
    out = {}
    for spec in op.attrs:
        if spec.name not in attrs or attrs[spec.name] is None:
            if spec.default is REQUIRED:
                raise RuleError(f"missing attribute '{spec.name}' ({spec.type})",
                                f"attrs.{spec.name}", GraphError)
            out[spec.name] = spec.default
            continue
        value = attrs[spec.name]
        if not _ATTR_CHECKS[spec.type](value):
            raise RuleError(f"attribute '{spec.name}' must be {spec.type}, got {value!r}",
                            f"attrs.{spec.name}", GraphError)
        out[spec.name] = _convert(spec, value)
    return op.normalize(out, shapes) if op.normalize else out


def check_dtypes(op: OpDef, names, dtypes, attrs=None) -> str:
    """The op's result dtype, by its own rule or else: operands share one dtype, which
    the result keeps; float-only ops refuse integers, and only some ops take bool."""
    if op.dtype is not None:
        return op.dtype(names, dtypes, **(attrs or {}))
    return shared_dtype(names, dtypes, op.float_only)


# A node of this many inputs gets its row's `references` even when each is distinct: its
# rules then find an input's place along the axis without a pass over the others.
COMPACT_FROM = 16


def compact_references(node, op: OpDef, attrs: dict, shapes) -> tuple:
    """(node, op, attrs) of a plan's node, with the inputs of a node that reads a value
    more than once (an op with a `references` rule) reduced to the distinct ones, in the
    order of first use, and the rule's `refs` among the attrs (also for COMPACT_FROM
    distinct inputs or more). Once per plan: one pass over the references, then
    vectorized work (`shapes`: name -> static shape)."""
    inputs = node.inputs
    if op.references is None or len(inputs) < 2:
        return node, op, attrs
    first: dict = {}
    positions = [first.setdefault(name, len(first)) for name in inputs]
    if len(first) == len(inputs) and len(inputs) < COMPACT_FROM:
        return node, op, attrs
    distinct = list(first)
    refs = np.array(positions, np.int64)
    compact = type(node)(node.name, node.op, distinct, node.attrs)
    bound = {k: v for k, v in attrs.items() if k != "node"}
    return compact, op, dict(attrs, refs=op.references(refs, [shapes[n] for n in distinct],
                                                       **bound))
