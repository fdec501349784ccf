"""Wire messages of slipstream: typed dataclasses, msgpack+raw-frame codec, boundary validation."""

from schemas.codec import decode, encode
from schemas.messages import SCHEMA_VERSION, Trajectory, TrajectoryGroup
from schemas.validate import Limits, WireError

__all__ = ["SCHEMA_VERSION", "Limits", "Trajectory", "TrajectoryGroup", "WireError", "decode", "encode"]
