"""gradserve.engine: computational graphs, forward and reverse mode, the mode planner.

Depends on numpy only; knows nothing of gRPC or protobuf.
"""

from .compiled import Differentiation, JacobianResult, JVPResult, Plan, VJPResult, compile
from .errors import (DifferentiationError, DTypeError, EngineError, GraphError, InputError,
                     ResourceLimitError, ShapeError)
from .ir import DTYPES, FLOAT_DTYPES, Graph, Input, Node
from .ops import OPS, AttrSpec, OpDef
from .planner import REVERSE_COST_RATIO, PlannerDecision, plan_mode
from .shapes import MAX_RANK, MAX_SPAN
from .trace import EdgeTrace, NodeTrace, Trace, trace

__all__ = [
    "AttrSpec", "DTYPES", "DifferentiationError", "Differentiation", "DTypeError", "EdgeTrace",
    "EngineError", "FLOAT_DTYPES", "Graph", "GraphError", "Input", "InputError",
    "JacobianResult", "JVPResult", "MAX_RANK", "MAX_SPAN", "Node", "NodeTrace", "OPS", "OpDef", "Plan",
    "PlannerDecision", "REVERSE_COST_RATIO", "ResourceLimitError", "ShapeError", "Trace",
    "VJPResult", "compile", "plan_mode", "trace",
]
