"""gradserve.engine: computational graphs, forward and reverse mode, the mode planner.

Depends on numpy only; knows nothing of gRPC or protobuf.
"""

from .errors import (DifferentiationError, DTypeError, EngineError, GraphError, InputError,
                     ResourceLimitError, ShapeError)
from .ir import DTYPES, FLOAT_DTYPES, Graph, Input, Node
from .ops import OPS, AttrSpec, OpDef
from .plan import JacobianResult, JVPResult, Plan, VJPResult, compile
from .planner import REVERSE_COST_RATIO, ModeDecision, plan_mode
from .trace import EdgeTrace, NodeTrace, Trace, trace

__all__ = [
    "AttrSpec", "DTYPES", "DifferentiationError", "DTypeError", "EdgeTrace", "EngineError",
    "FLOAT_DTYPES", "Graph", "GraphError", "Input", "InputError", "JacobianResult", "JVPResult",
    "ModeDecision", "Node", "NodeTrace", "OPS", "OpDef", "Plan", "REVERSE_COST_RATIO",
    "ResourceLimitError", "ShapeError", "Trace", "VJPResult", "compile", "plan_mode", "trace",
]
