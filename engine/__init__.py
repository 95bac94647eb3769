"""gradserve.engine: computational graphs, forward and reverse mode, second order, the
mode planner.

Depends on numpy only; knows nothing of gRPC or protobuf.
"""

from .budget import Budget
from .compiled import JVPResult, Plan, Residuals, VJPResult, compile
from .errors import (DeadlineExceeded, DifferentiationError, DTypeError, EngineError,
                     GraphError, InputError, ResourceLimitError, ShapeError)
from .ir import DTYPES, FLOAT_DTYPES, Graph, Input, Node
from .jacobian import JacobianResult
from .ops import OPS, AttrSpec, OpDef
from .planner import (HVP_COST_RATIO, REVERSE_COST_RATIO, PlannerDecision, plan_mode,
                      plan_second_order)
from .request import Differentiation
from .second import HessianResult, HVPResult, SecondOrder
from .sgd import SGDResult, sgd_steps
from .sparse import SparseBlock
from .sparsity import MAX_PATTERN_ENTRIES
from .shapes import MAX_RANK, MAX_SPAN
from .tracing import EdgeTrace, NodeTrace, Trace, trace

__all__ = [
    "AttrSpec", "Budget", "MAX_PATTERN_ENTRIES", "SparseBlock", "DTYPES", "DeadlineExceeded", "DifferentiationError",
    "Differentiation", "DTypeError", "EdgeTrace", "EngineError", "FLOAT_DTYPES", "Graph",
    "GraphError", "HessianResult", "HVP_COST_RATIO", "HVPResult", "Input", "InputError",
    "JacobianResult", "JVPResult", "MAX_RANK", "MAX_SPAN", "Node", "NodeTrace", "OPS", "OpDef",
    "Plan", "PlannerDecision", "REVERSE_COST_RATIO", "Residuals", "ResourceLimitError",
    "SGDResult", "SecondOrder", "ShapeError", "Trace", "VJPResult", "compile", "sgd_steps",
    "plan_mode", "plan_second_order", "trace",
]
