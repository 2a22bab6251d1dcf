"""Sans-IO ICE (RFC 8445): candidates, check lists and the per-connection agent."""

from .agent import IceAgent
from .candidate import Candidate, candidate_foundation, candidate_priority, pair_priority
from .types import (
    Connected,
    Disconnected,
    Failed,
    IceEvent,
    NominatedPairChanged,
    Transmit,
    path_kind,
)

__all__ = [
    "Candidate",
    "Connected",
    "Disconnected",
    "Failed",
    "IceAgent",
    "IceEvent",
    "NominatedPairChanged",
    "Transmit",
    "candidate_foundation",
    "candidate_priority",
    "pair_priority",
    "path_kind",
]
