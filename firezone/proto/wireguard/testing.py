"""An in-memory pair of Tunnels with a virtual clock, for tests and simulations.

Datagrams travel instantly unless a test holds them; ``advance_to`` fires timers in order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from firezone.proto.rng import SeededRng

from .keys import generate_private_key, public_key
from .tunnel import Tunnel, TunnelEvent

Filter = Callable[[str, bytes], bool]


class TunnelPair:
    """Tunnel ``a`` and tunnel ``b`` wired back to back."""

    def __init__(
        self,
        *,
        seed: int = 0,
        now: float = 1000.0,
        unix_time: float = 1_700_000_000.0,
        psk_a: bytes | None = None,
        psk_b: bytes | None = None,
        **kwargs: object,
    ) -> None:
        self.rng = SeededRng(seed)
        self.now = now
        self.a_private = generate_private_key(self.rng)
        self.b_private = generate_private_key(self.rng)

        self.a_public = public_key(self.a_private)
        self.b_public = public_key(self.b_private)
        self.a = Tunnel(
            static_private=self.a_private, peer_public=self.b_public, preshared_key=psk_a,
            index=0xA, rng=self.rng, now=now, unix_time=unix_time, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
        self.b = Tunnel(
            static_private=self.b_private, peer_public=self.a_public, preshared_key=psk_b,
            index=0xB, rng=self.rng, now=now, unix_time=unix_time, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
        self.received: dict[str, list[bytes]] = {"a": [], "b": []}
        self.events: dict[str, list[TunnelEvent]] = {"a": [], "b": []}
        self.sent: dict[str, list[bytes]] = {"a": [], "b": []}
        # Return False from the filter to drop a datagram ("a" means sent by a).
        self.filter: Filter = lambda side, dg: True

    def tunnel(self, side: str) -> Tunnel:
        return self.a if side == "a" else self.b

    def _collect(self) -> list[tuple[str, bytes]]:
        out = []
        for side in ("a", "b"):
            t = self.tunnel(side)
            while (dg := t.poll_transmit()) is not None:
                self.sent[side].append(dg)
                out.append((side, dg))
            while (ev := t.poll_event()) is not None:
                self.events[side].append(ev)
        return out

    def deliver(self, side: str, datagram: bytes) -> bytes | None:
        """Hand a datagram sent by ``side`` to the other tunnel now."""
        other = "b" if side == "a" else "a"
        pkt = self.tunnel(other).decapsulate(datagram, self.now)
        if pkt is not None:
            self.received[other].append(pkt)
        return pkt

    def pump(self) -> None:
        """Deliver queued output both ways until both tunnels are quiet."""
        for _ in range(1000):
            batch = self._collect()
            if not batch:
                return
            for side, dg in batch:
                if self.filter(side, dg):
                    self.deliver(side, dg)
        raise AssertionError("tunnels did not go quiet")

    def send(self, side: str, packet: bytes) -> bytes | None:
        """Encapsulate on ``side`` and deliver everything; returns what the peer's TUN got."""
        other = "b" if side == "a" else "a"
        before = len(self.received[other])
        out = self.tunnel(side).encapsulate(packet, self.now)
        if out is not None:
            self.sent[side].append(out)
            if self.filter(side, out):
                self.deliver(side, out)
        self.pump()
        got = self.received[other][before:]
        return got[-1] if got else None

    def advance_to(self, t: float) -> None:
        """Move the clock to ``t``, firing every timer on the way in order."""
        for _ in range(100_000):
            self.pump()
            deadlines = [d for d in (self.a.poll_timeout(), self.b.poll_timeout()) if d is not None]
            nxt = min(deadlines) if deadlines else None
            if nxt is None or nxt > t:
                break
            self.now = max(self.now, nxt)
            self.a.handle_timeout(self.now)
            self.b.handle_timeout(self.now)
        else:
            raise AssertionError("timers did not settle")
        self.now = max(self.now, t)
        self.pump()

    def advance(self, dt: float) -> None:
        self.advance_to(self.now + dt)


def ipv4_packet(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    """A minimal IPv4 packet (header checksum left zero: WireGuard does not look at it)."""

    total = 20 + len(payload)
    return (
        bytes([0x45, 0, total >> 8, total & 0xFF, 0, 0, 0, 0, 64, proto, 0, 0])
        + ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + payload
    )


def ipv6_packet(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    """A minimal IPv6 packet."""

    n = len(payload)
    return (
        bytes([0x60, 0, 0, 0, n >> 8, n & 0xFF, proto, 64])
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )
