"""gradserve.client: build graphs and talk to a gradserve server.

Imports the wire API (gradserve.v1) only, never the engine: a user can install
the package and talk to a remote server.
"""

from .builder import GraphBuilder, Value, load_graph
from .client import TLS, Client, DifferentiateSession, EdgeTrace, NodeTrace, PlannerDecision, Result
from .onnx import OnnxImport, OnnxImportError, from_onnx  # needs the onnx package when called
from .store import StoredTensor, TensorHandle

__all__ = ["TLS", "Client", "DifferentiateSession", "EdgeTrace", "GraphBuilder", "NodeTrace",
           "OnnxImport", "OnnxImportError", "PlannerDecision", "Result", "StoredTensor",
           "TensorHandle", "Value", "from_onnx", "load_graph"]
