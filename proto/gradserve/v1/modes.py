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
