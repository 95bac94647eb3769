"""The engine's exceptions: one base class, each naming the node, op and field.

The server maps these to gRPC status codes in one table; nothing here knows
about gRPC.

Messages echo what the user sent (names, shapes, attribute values) through
`echo`, at most ECHO_LIMIT characters each, and a whole message is at most
MESSAGE_LIMIT characters (`clip` cuts the middle out): an 8 KB node name or a
1,000,000-entry attribute must not become a megabyte error string, which gRPC
would refuse to carry in its trailers.
"""

from __future__ import annotations

ECHO_LIMIT = 80  # characters of one user-given value (name, list, repr) in a message
MESSAGE_LIMIT = 1024  # characters of one whole error message


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text`, or its head and tail around a note of how much was cut, in `limit`
    characters at most (the tail often says what was expected)."""
    if len(text) <= limit:
        return text
    note = f"...[{len(text):,} characters]..."
    head = max(0, (limit - len(note)) * 2 // 3)
    tail = max(0, limit - len(note) - head)
    return text[:head] + note + (text[-tail:] if tail else "")


def echo(value, limit: int = ECHO_LIMIT) -> str:
    """A user-given value as a message shows it: a string as is, anything else as its
    repr, in about `limit` characters; a long list or tuple shows its first items and
    its length, without building the repr of the whole of it."""
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, (list, tuple)):
        parts, used = [], 2
        for item in value[:limit]:
            parts.append(clip(repr(item), max(limit // 3, 40)))
            used += len(parts[-1]) + 2
            if used > limit - 20:
                break
        open_, close = "[]" if isinstance(value, list) else "()"
        if len(parts) < len(value):
            return f"{open_}{', '.join(parts)}, ... ({len(value):,} items){close}"
        if len(parts) == 1 and isinstance(value, tuple):
            return f"({parts[0]},)"
        return f"{open_}{', '.join(parts)}{close}"
    return clip(repr(value), limit)


class EngineError(Exception):
    """Base class. `node`, `op` and `field` say where the problem is (or None)."""

    def __init__(self, message: str, *, node: str | None = None,
                 op: str | None = None, field: str | None = None):
        self.node = node
        self.op = op
        self.field = field
        super().__init__(clip(self._format(message)))

    def _format(self, message: str) -> str:
        if self.node is not None and self.op is not None:
            return f"node '{echo(self.node)}' ({echo(self.op)}): {message}"
        if self.node is not None:
            return f"'{echo(self.node)}': {message}"
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


class DeadlineExceeded(EngineError):
    """The request's Budget deadline passed while it ran (engine/budget.py)."""


class RuleError(Exception):
    """Raised inside an op's shape rule; validation re-raises it as an
    EngineError subclass (`kind`) that names the node and op."""

    def __init__(self, message: str, field: str | None = None, kind: type = ShapeError):
        super().__init__(clip(message))
        self.field = field
        self.kind = kind
