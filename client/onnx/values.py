"""What the importer computes with: dynamic dimensions (Dim), graph values with their
shapes tracked (Dyn), sequences and the errors (the import's result, OnnxImport, is model.py's)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from gradserve.v1.codec import WIRE_DTYPES  # noqa: F401 (the wire's dtypes, one table)

from ..builder import Value
from .model import OnnxImport  # noqa: F401 (the import's result, with its calls)

OLDEST_OPSET = 13
PARAMETER_MODES = ("auto", "constants", "inputs")
# `gradserve serve`'s default max_message_bytes: with parameters="auto" and no client, the
# initializers stay constants up to half of it
DEFAULT_MESSAGE_BYTES = 64 * 2 ** 20
ONNX_EXTRA_HINT = "pip install 'gradserve[onnx]'"
INT_MAX = 2 ** 63 - 1
# What import-time folds may allocate in all, beyond twice the model's own initializers
# (a few bytes of Expand or ConstantOfShape can ask for gigabytes).
MAX_FOLD_BYTES = 256 * 2 ** 20


class OnnxImportError(ValueError):
    """A model that cannot be imported; the message names the node, its op type and what
    to do."""


class _FoldError(Exception):
    """Raised inside a converter; the importer adds the node's name and op type."""


# --- dynamic dimensions --------------------------------------------------------------
# A dimension whose size is only known at run time is a monomial coef * N^p * M^q...,
# enough for what exporters do with a batch size: multiply, divide exactly, compare.

class Dim:
    __slots__ = ("coef", "syms")

    def __init__(self, coef, syms):
        self.coef, self.syms = Fraction(coef), tuple(sorted(syms))

    @staticmethod
    def symbol(name: str) -> "Dim":
        return Dim(1, ((name, 1),))

    @staticmethod
    def _make(coef, syms):
        syms = tuple((s, p) for s, p in syms if p)
        if not syms:
            if coef.denominator != 1:
                raise _FoldError(f"shape arithmetic gives a fraction ({coef})")
            return int(coef)
        return Dim(coef, syms)

    def _combine(self, other, sign):
        powers = dict(self.syms)
        for s, p in other.syms:
            powers[s] = powers.get(s, 0) + sign * p
        return powers.items()

    def __mul__(self, other):
        if isinstance(other, Dim):
            return Dim._make(self.coef * other.coef, self._combine(other, 1))
        if _is_int(other):
            return Dim._make(self.coef * int(other), self.syms)
        raise _FoldError(f"the dynamic dimension {self} is used in arithmetic with {other!r}")

    __rmul__ = __mul__

    def _divide(self, other):
        if isinstance(other, Dim):
            return Dim._make(self.coef / other.coef, self._combine(other, -1))
        if _is_int(other) and int(other) != 0:
            return Dim._make(self.coef / int(other), self.syms)
        raise _FoldError(f"the dynamic dimension {self} is divided by {other!r}")

    __floordiv__ = __truediv__ = _divide

    def __rfloordiv__(self, other):
        if _is_int(other):
            return Dim(int(other), ())._divide(self)
        raise _FoldError(f"{other!r} is divided by the dynamic dimension {self}")

    __rtruediv__ = __rfloordiv__

    def _same_term(self, other):
        return isinstance(other, Dim) and other.syms == self.syms

    def __add__(self, other):
        if self._same_term(other):
            return Dim._make(self.coef + other.coef, self.syms)
        if _is_int(other) and int(other) == 0:
            return self
        raise _FoldError(f"shape arithmetic {self} + {other} cannot be folded with a dynamic "
                         "dimension: give the input a fixed size (input_shapes=...)")

    __radd__ = __add__

    def __neg__(self):
        return Dim._make(-self.coef, self.syms)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mod__(self, other):
        if _is_int(other) and int(other) != 0 and self.coef.denominator == 1 \
                and self.coef.numerator % int(other) == 0:
            return 0
        raise _FoldError(f"{self} mod {other} cannot be folded with a dynamic dimension")

    def __eq__(self, other):
        if isinstance(other, Dim):
            return self.coef == other.coef and self.syms == other.syms
        return False  # a dynamic size is taken to differ from every fixed one

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((self.coef, self.syms))

    def _order(self, other):
        raise _FoldError(f"the dynamic dimension {self} is compared with {other!r}")

    __lt__ = __le__ = __gt__ = __ge__ = _order

    def __repr__(self):
        term = "*".join(s if p == 1 else f"{s}^{p}" for s, p in self.syms)
        return term if self.coef == 1 else f"{self.coef}*{term}"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _has_dim(values) -> bool:
    return any(isinstance(v, Dim) for v in np.asarray(values, dtype=object).ravel())


def _engine_shape(shape, what="shape") -> list[int]:
    """A shape for an engine attribute or input: its one dynamic entry as -1."""
    dims = [d for d in shape if isinstance(d, Dim)]
    if len(dims) > 1:
        raise _FoldError(f"{what} {_fmt(shape)} has more than one dynamic dimension; the "
                         "engine takes one -1: give the inputs fixed sizes (input_shapes=...)")
    return [-1 if isinstance(d, Dim) else int(d) for d in shape]


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _prod(values):
    out = 1
    for v in values:
        out = out * v
    return out

# --- values under import ---------------------------------------------------------------
# A tensor is either known now (a numpy array, object dtype when it holds a Dim) or a
# value of the graph (Dyn) with its shape and dtype tracked here.

class Dyn:
    __slots__ = ("_value", "shape", "dtype", "array", "_make")

    def __init__(self, value, shape, dtype, array=None, make=None):
        self._value, self.shape, self.dtype = value, tuple(shape), np.dtype(dtype).name
        self.array, self._make = array, make  # a parameter: its value, made on first use

    @property
    def value(self) -> Value:
        if self._value is None:
            self._value = self._make()
        return self._value

    @property
    def ndim(self):
        return len(self.shape)


class Seq(list):
    """An ONNX sequence of tensors whose length is known at import time."""


def _shape_of(x):
    return x.shape if isinstance(x, Dyn) else np.shape(x)


def _dtype_of(x) -> str:
    return x.dtype if isinstance(x, Dyn) else np.asarray(x).dtype.name


def _broadcast(*shapes):
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(-ndim, 0):
        dim = 1
        for s in shapes:
            d = s[axis] if -axis <= len(s) else 1
            if d == 1 or d == dim:
                continue
            if dim == 1:
                dim = d
            else:
                raise _FoldError("shapes " + " and ".join(_fmt(s) for s in shapes)
                                 + " do not broadcast")
        out.append(dim)
    return tuple(out)


def _norm_axis(axis, ndim, what="axis"):
    axis = int(axis)
    if not -ndim <= axis < max(ndim, 1):
        raise _FoldError(f"{what} {axis} is out of range for rank {ndim}")
    return axis % ndim if ndim else 0


def _fail(what):
    raise _FoldError(f"{what} cannot be folded with a dynamic dimension")

