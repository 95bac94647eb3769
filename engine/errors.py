"""The engine's exceptions: one base class, each naming the node, op and field.

The server maps these to gRPC status codes in one table; nothing here knows
about gRPC.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class. `node`, `op` and `field` say where the problem is (or None)."""

    def __init__(self, message: str, *, node: str | None = None,
                 op: str | None = None, field: str | None = None):
        self.node = node
        self.op = op
        self.field = field
        self.detail = message
        super().__init__(self._format(message))

    def _format(self, message: str) -> str:
        if self.node is not None and self.op is not None:
            return f"node '{self.node}' ({self.op}): {message}"
        if self.node is not None:
            return f"'{self.node}': {message}"
        return message


class GraphError(EngineError):
    """The graph itself is malformed: names, references, ops, arity, attributes."""


class ShapeError(GraphError):
    """Shapes do not broadcast, align, or fit an op's rule."""


class DTypeError(GraphError):
    """A dtype is unsupported or does not match what the op needs."""


class InputError(EngineError):
    """Values passed at run time (inputs, tangents, cotangents) do not fit the graph."""


class DifferentiationError(EngineError):
    """A derivative was asked with respect to, or of, something that has none."""


class ResourceLimitError(EngineError):
    """The estimated memory of a request is over the limit it was given."""


class RuleError(Exception):
    """Raised inside an op's shape rule; validation re-raises it as an
    EngineError subclass (`kind`) that names the node and op."""

    def __init__(self, message: str, field: str | None = None, kind: type = ShapeError):
        super().__init__(message)
        self.field = field
        self.kind = kind
