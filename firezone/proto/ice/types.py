"""Values the ICE agent and TURN allocation hand to their driver: datagrams and events."""

from __future__ import annotations

from dataclasses import dataclass

from .candidate import Addr, Candidate

PATH_KINDS = ("host", "srflx", "relay")


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``payload`` from ``src`` to ``dst``.

    ``src`` is a socket's base address or a relayed address (to be sent through that TURN
    allocation); None means the node's default socket (a TURN allocation built without ``local``).
    """

    src: Addr | None
    dst: Addr
    payload: bytes


class IceEvent:
    """Base class of everything :meth:`IceAgent.poll_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Connected(IceEvent):
    """The first pair was nominated; traffic can flow from ``local.base`` to ``remote.addr``."""

    local: Candidate
    remote: Candidate
    kind: str
    rtt: float | None

    def __post_init__(self) -> None:
        if self.kind not in PATH_KINDS:
            raise ValueError(f"unknown path kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class NominatedPairChanged(IceEvent):
    """A different pair was nominated while connected (a better one, or a fallback)."""

    local: Candidate
    remote: Candidate
    kind: str
    rtt: float | None

    def __post_init__(self) -> None:
        if self.kind not in PATH_KINDS:
            raise ValueError(f"unknown path kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Disconnected(IceEvent):
    """The nominated pair stopped answering consent checks and no other pair is usable."""


@dataclass(frozen=True, slots=True)
class Failed(IceEvent):
    """Every candidate pair failed (or no remote candidate arrived in time)."""

    reason: str


def path_kind(local: Candidate, remote: Candidate) -> str:
    """``relay`` if either end is relayed, ``srflx`` if either end is NAT-mapped, else ``host``."""
    kinds = {local.kind, remote.kind}
    if "relay" in kinds:
        return "relay"
    if kinds & {"srflx", "prflx"}:
        return "srflx"
    return "host"
