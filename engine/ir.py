"""The graph IR: plain dataclasses, independent of protobuf and gRPC.

Nodes are listed in topological order: every name a node reads is a graph
input, a constant or an earlier node. That single rule rules out cycles and
dangling references and lets validation run as one iterative pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

DTYPES = ("float32", "float64", "int32", "int64", "bool")
FLOAT_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Input:
    """A graph input: `shape` may hold -1 for a dimension of any size."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __init__(self, name: str, dtype: str, shape: Sequence[int]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", str(dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))


@dataclass(frozen=True)
class Node:
    """One operation: `op` names a row of the op table, `inputs` earlier names."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, name: str, op: str, inputs: Sequence[str],
                 attrs: Mapping[str, Any] | None = None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "attrs", dict(attrs or {}))


@dataclass
class Graph:
    """Inputs, constants (name -> numpy array), nodes in topological order, outputs."""

    inputs: list[Input]
    nodes: list[Node]
    outputs: list[str]
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.inputs = list(self.inputs)
        self.nodes = list(self.nodes)
        self.outputs = list(self.outputs)
        self.constants = {k: np.asarray(v) for k, v in dict(self.constants).items()}
