"""The converters, one module per op family; importing them registers them."""

from . import elementwise, indexing, linalg, nn, reductions, shapes  # noqa: F401
