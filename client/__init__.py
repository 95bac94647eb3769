"""gradserve.client: build graphs and talk to a gradserve server.

Imports the wire API (gradserve.v1) only, never the engine: a user can install
the package and talk to a remote server.
"""

from .builder import GraphBuilder, Value, load_graph
from .client import TLS, Client, DifferentiateSession, EdgeTrace, NodeTrace, PlannerDecision, Result

__all__ = ["TLS", "Client", "DifferentiateSession", "EdgeTrace", "GraphBuilder", "NodeTrace",
           "PlannerDecision", "Result", "Value", "load_graph"]
