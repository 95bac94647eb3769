"""erf for NumPy arrays (NumPy has none; math.erf is scalar).

float64: W. J. Cody, "Rational Chebyshev approximations for the error
function", Math. Comp. 23 (1969), as in his SPECFUN routine CALERF: three
rational approximations, on |x| <= 0.5 (of erf), 0.5 < |x| <= 4 and |x| > 4
(of erfc, times exp(-x^2)). Within 2 ulp of math.erf.

float32: one rational approximation x P(x^2) / Q(x^2) on x clipped to [-4, 4]
(Eigen's generic_fast_erf_float), in float32: within 8 float32 ulp (5e-7
relative) and about five times faster than the float64 route, which matters
for GELU in float32 models.

tests/engine/test_ops_edges.py checks both against math.erf on dense grids.
"""

from __future__ import annotations

from math import prod

import numpy as np

from .costs import OpCost, iteration

_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
      3.20937758913846947e03, 1.85777706184603153e-1)
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
      2.84423683343917062e03)
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
      2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
      2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
      1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
      3.43936767414372164e03, 1.23033935480374942e03)
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
      1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
      6.05183413124413191e-2, 2.33520497626869185e-3)
_ONE = 27.0  # erfc(27) < 1e-300: beyond it erf is 1 in float64
# float32: numerator (odd, highest power first) and denominator (even) coefficients
_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
         -7.37332916720468e-03, -1.42647390514189e-02)


def _exp_minus_square(y):
    """exp(-y^2), with y^2 split so that its rounding error does not grow with y."""
    head = np.trunc(y * 16) / 16
    return np.exp(-head * head) * np.exp(-(y - head) * (y + head))


def _small(y):
    """erf(y) for 0 <= y <= 0.5."""
    yy = y * y
    num, den = _A[4] * yy, yy
    for a, b in zip(_A[:3], _B[:3]):
        num, den = (num + a) * yy, (den + b) * yy
    return y * (num + _A[3]) / (den + _B[3])


def _middle(y):
    """erfc(y) for 0.5 < y <= 4."""
    num, den = _C[8] * y, y
    for c, d in zip(_C[:7], _D[:7]):
        num, den = (num + c) * y, (den + d) * y
    return _exp_minus_square(y) * (num + _C[7]) / (den + _D[7])


def _large(y):
    """erfc(y) for 4 < y < 27."""
    r = 1 / (y * y)
    num, den = _P[5] * r, r
    for p, q in zip(_P[:4], _Q[:4]):
        num, den = (num + p) * r, (den + q) * r
    r = r * (num + _P[4]) / (den + _Q[4])
    return _exp_minus_square(y) * (1 / np.sqrt(np.pi) - r) / y


_ALPHA32 = tuple(np.float32(a) for a in _ALPHA)
_BETA32 = tuple(np.float32(b) for b in _BETA)
_FOUR32 = np.float32(4)


def _erf32(x):
    # maximum then minimum: NumPy's clip (a Python wrapper) costs more than both passes on
    # a GELU's activations; NaN stays NaN either way
    x = np.minimum(np.maximum(x, -_FOUR32), _FOUR32)
    xx = x * x
    num = xx * _ALPHA32[0]  # Horner from the first product: no array of the constant
    num += _ALPHA32[1]
    for a in _ALPHA32[2:]:
        num *= xx
        num += a
    num *= x
    den = xx * _BETA32[0]
    den += _BETA32[1]
    for b in _BETA32[2:]:
        den *= xx
        den += b
    num /= den
    return num


# erf runs over chunks of this many elements: its temporaries (about ten arrays of a
# chunk's size on the float64 route) stay a fixed few MiB whatever the input's size, and
# the deadline is checked between chunks (costs.iteration()).
CHUNK = 1 << 16
_SCRATCH = 12  # arrays of a chunk's size, float64, the float64 route holds at its peak


def _erf64(x):
    y = np.abs(np.asarray(x, np.float64))
    out = np.ones_like(y)
    small = ~(y > 0.5)  # NaN goes here and stays NaN
    middle = (y > 0.5) & (y <= 4.0)
    large = (y > 4.0) & (y < _ONE)
    out[small] = _small(y[small])
    out[middle] = 1 - _middle(y[middle])
    out[large] = 1 - _large(y[large])
    return np.copysign(out, x)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in x's floating dtype."""
    x = np.asarray(x)
    route = _erf32 if x.dtype == np.float32 else _erf64
    if x.size <= CHUNK:
        return route(x).astype(x.dtype, copy=False)
    out = np.empty(x.shape, x.dtype)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, x.size, CHUNK):
        iteration()
        flat_out[start:start + CHUNK] = route(flat_in[start:start + CHUNK])
    return out


def erf_scratch(size: int) -> int:
    """Bytes erf holds beyond its input and output: the temporaries of one chunk."""
    return _SCRATCH * 8 * min(size, CHUNK)


def erf_cost(mode, shapes, out, dtype):
    """The erf row's cost: one chunk's temporaries and about 20 passes (two rational
    functions) for its values; its derivative 2/sqrt(pi) exp(-x^2) and second
    derivative -2x times that, a few arrays of x's size each."""
    size = prod(out)
    isz = dtype.itemsize
    if mode == "values":
        return OpCost(erf_scratch(size) + size * isz, 20 * size, -(-size // CHUNK))
    if mode in ("forward", "reverse"):
        return OpCost(3 * size * isz, 5 * size)
    return OpCost(5 * size * isz, 10 * size)
