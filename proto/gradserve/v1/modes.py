"""Mode names ("auto", "forward", "reverse") and their wire enums: the one mapping,
shared by the server and the client."""

from __future__ import annotations

from . import gradient_service_pb2 as pb

# Name -> wire enum; MODE_UNSPECIFIED (an unset field) reads as "auto".
WIRE_MODES = {"auto": pb.MODE_AUTO, "forward": pb.MODE_FORWARD, "reverse": pb.MODE_REVERSE}
MODE_NAMES = {**{wire: name for name, wire in WIRE_MODES.items()},
              pb.MODE_UNSPECIFIED: "auto"}


def mode_name(wire: int) -> str | None:
    """The name of a wire mode, or None for a value this version does not know."""
    return MODE_NAMES.get(wire)


# Sparsity names and their wire enums (DifferentiateRequest.sparsity, PlannerDecision):
# SPARSITY_UNSPECIFIED reads as None: the planner may compress, blocks stay dense.
WIRE_SPARSITY = {"auto": pb.SPARSITY_AUTO, "dense": pb.SPARSITY_DENSE,
                 "sparse": pb.SPARSITY_SPARSE}
SPARSITY_NAMES = {wire: name for name, wire in WIRE_SPARSITY.items()}


def sparsity_name(wire: int) -> str | None:
    """The name of a wire sparsity, None for SPARSITY_UNSPECIFIED; raises KeyError for a
    value this version does not know."""
    return None if wire == pb.SPARSITY_UNSPECIFIED else SPARSITY_NAMES[wire]
