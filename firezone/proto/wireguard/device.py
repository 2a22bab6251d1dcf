"""Many WireGuard peers behind one static key, with cryptokey routing (whitepaper §2).

Theory of operation
-------------------
A :class:`Device` is what ``wg`` calls an interface. It owns one :class:`~.cookie.RateLimiter`
and one :class:`~.tunnel.Tunnel` per peer, and routes:

    TUN -> network   longest-prefix match of the destination over every peer's AllowedIPs
                     (memoised per address), then that peer's Tunnel encapsulates
    network -> TUN   by receiver index (the top 24 bits name the peer) or, for an initiation,
                     by the static key inside it; the decrypted packet is kept only if its
                     source address routes back to the same peer

Every authenticated datagram updates the peer's endpoint to its source (roaming). The device
drains its tunnels' output after each input and pairs each datagram with the peer's endpoint, so
callers only see ``poll_transmit() -> (datagram, (host, port))``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter, deque
from collections.abc import Iterable

from firezone.proto.rng import Rng

from . import handshake as hs
from .cookie import RateLimiter, verify_mac1
from .messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_LEN,
    TRANSPORT_MIN_LEN,
)
from .tunnel import Tunnel, TunnelEvent

__all__ = ["Device", "Peer"]

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
_ROUTE_CACHE_MAX = 65536


class Peer:
    """One configured peer of a Device."""

    __slots__ = ("_nets", "allowed_ips", "endpoint", "preshared_key", "public_key", "tunnel")

    def __init__(
        self,
        public_key: bytes,
        preshared_key: bytes | None,
        endpoint: Endpoint | None,
        allowed_ips: list[str],
        tunnel: Tunnel,
    ) -> None:
        self.public_key = public_key
        self.preshared_key = preshared_key
        self.endpoint = endpoint
        self.tunnel = tunnel
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.allowed_ips: list[str] = []
        self._set_allowed_ips(allowed_ips)

    def _set_allowed_ips(self, allowed_ips: Iterable[str]) -> None:
        nets = []
        for text in allowed_ips:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ValueError(f"invalid allowed IP {text!r}") from None
        self._nets = nets
        self.allowed_ips = [str(n) for n in nets]

    @property
    def persistent_keepalive(self) -> float | None:
        return self.tunnel.persistent_keepalive

    @property
    def last_handshake_unix(self) -> float | None:
        return self.tunnel.last_handshake_unix

    @property
    def rx_bytes(self) -> int:
        return self.tunnel.rx_bytes

    @property
    def tx_bytes(self) -> int:
        return self.tunnel.tx_bytes

    def __repr__(self) -> str:
        return f"Peer(allowed_ips={self.allowed_ips}, endpoint={self.endpoint})"


class Device:
    """A WireGuard interface: one static key, many peers, cryptokey routing."""

    def __init__(
        self,
        private_key: bytes,
        *,
        rng: Rng,
        now: float,
        unix_time: float,
        handshake_limit_per_second: int = 100,
    ) -> None:
        self._identity = hs.LocalIdentity(private_key)
        self.private_key = private_key
        self.public_key = self._identity.public
        self._rng = rng
        self._unix_offset = unix_time - now
        self.rate_limiter = RateLimiter(
            static_public=self.public_key, rng=rng, limit_per_second=handshake_limit_per_second
        )
        self._peers: dict[bytes, Peer] = {}
        self._by_index: dict[int, Peer] = {}
        # prefix length -> {network int: peer}, per address length (4 or 16 bytes)
        self._routes: dict[int, dict[int, dict[int, Peer]]] = {4: {}, 16: {}}
        self._route_lens: dict[int, list[int]] = {4: [], 16: []}
        self._route_cache: dict[bytes, Peer | None] = {}
        self._tx: deque[tuple[bytes, Endpoint]] = deque()
        self._events: deque[tuple[bytes, TunnelEvent]] = deque()
        self._out_at = now
        self.drops: Counter[str] = Counter()

    # ------------------------------------------------------------------ peers

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(public_key)

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[str] = (),
        endpoint: Endpoint | None = None,
        persistent_keepalive: int | None = None,
        now: float,
    ) -> Peer:
        """Add a peer, or update it if the key is known (a new PSK restarts its tunnel)."""
        if len(public_key) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a peer cannot use the device's own public key")
        if preshared_key is not None and len(preshared_key) != 32:
            raise ValueError("preshared key must be 32 bytes")
        pk = float(persistent_keepalive) if persistent_keepalive else None
        existing = self._peers.get(public_key)
        if existing is not None and existing.preshared_key == preshared_key:
            existing.tunnel.set_persistent_keepalive(pk, now)
            if endpoint is not None:
                existing.endpoint = endpoint
            existing._set_allowed_ips(allowed_ips)
            self._claim_allowed_ips(existing)
            return existing
        if existing is not None:
            self.remove_peer(public_key)
            if endpoint is None:
                endpoint = existing.endpoint
        index = self._free_index()
        tunnel = Tunnel(
            static_private=self.private_key,
            peer_public=public_key,
            preshared_key=preshared_key,
            index=index,
            rng=self._rng,
            now=now,
            unix_time=self._unix_offset + now,
            persistent_keepalive=pk,
            identity=self._identity,
        )
        peer = Peer(public_key, preshared_key, endpoint, list(allowed_ips), tunnel)
        self._peers[public_key] = peer
        self._by_index[index] = peer
        self._claim_allowed_ips(peer)
        log.debug("wg peer added", extra={"allowed_ips": peer.allowed_ips})
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer and its routes (no-op for an unknown key)."""
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self._by_index.pop(peer.tunnel.index, None)
        self._rebuild_routes()

    def _free_index(self) -> int:
        while True:
            index = self._rng.randbelow(1 << 24)
            if index not in self._by_index:
                return index

    def _claim_allowed_ips(self, owner: Peer) -> None:
        # As in wg(8): an allowed IP belongs to exactly one peer; the last one to claim it wins.
        mine = set(owner._nets)
        for other in self._peers.values():
            if other is not owner and mine.intersection(other._nets):
                other._set_allowed_ips(str(n) for n in other._nets if n not in mine)
        self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        routes: dict[int, dict[int, dict[int, Peer]]] = {4: {}, 16: {}}
        for peer in self._peers.values():
            for net in peer._nets:
                alen = 4 if net.version == 4 else 16
                table = routes[alen].setdefault(net.prefixlen, {})
                table[int(net.network_address)] = peer
        self._routes = routes
        self._route_lens = {k: sorted(v, reverse=True) for k, v in routes.items()}
        self._route_cache.clear()

    def _lookup(self, addr: bytes) -> Peer | None:
        cache = self._route_cache
        try:
            return cache[addr]
        except KeyError:
            pass
        alen = len(addr)
        bits = alen * 8
        value = int.from_bytes(addr, "big")
        found = None
        routes = self._routes[alen]
        for plen in self._route_lens[alen]:
            net = value >> (bits - plen) << (bits - plen) if plen else 0
            found = routes[plen].get(net)
            if found is not None:
                break
        if len(cache) >= _ROUTE_CACHE_MAX:
            cache.clear()
        cache[addr] = found
        return found

    def route(self, address: str) -> Peer | None:
        """The peer whose AllowedIPs hold ``address`` (longest prefix), if any."""
        return self._lookup(ipaddress.ip_address(address).packed)

    # ------------------------------------------------------------- data path

    def handle_tun_packet(
        self, packet: bytes | memoryview, now: float
    ) -> tuple[bytes, Endpoint] | None:
        """Encrypt a packet read from the TUN; returns (datagram, endpoint) to send now or None."""
        n = len(packet)
        if n >= 20 and packet[0] >> 4 == 4:
            dst = bytes(packet[16:20])
        elif n >= 40 and packet[0] >> 4 == 6:
            dst = bytes(packet[24:40])
        else:
            self.drops["malformed"] += 1
            return None
        peer = self._lookup(dst)
        if peer is None:
            self.drops["no_route"] += 1
            return None
        tunnel = peer.tunnel
        out = tunnel.encapsulate(packet, now)
        if tunnel._tx:
            self._drain(peer, now)
        if out is None:
            return None
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return None
        return out, peer.endpoint

    def handle_datagram(self, data: bytes | memoryview, src: Endpoint, now: float) -> bytes | None:
        """Process a UDP datagram; returns a decrypted IP packet for the TUN or None."""
        n = len(data)
        if n < 4:
            self.drops["malformed"] += 1
            return None
        mtype = data[0]
        if mtype == MSG_TRANSPORT and n >= TRANSPORT_MIN_LEN:
            peer = self._by_index.get(int.from_bytes(data[5:8], "little"))
            if peer is None:
                self.drops["index"] += 1
                return None
            tunnel = peer.tunnel
            before = tunnel.rx_packets
            packet = tunnel.decapsulate(data, now)
            if tunnel.rx_packets != before:
                peer.endpoint = src
            if tunnel._tx or tunnel._events:
                self._drain(peer, now)
            if packet is None:
                return None
            if len(packet) >= 20 and packet[0] >> 4 == 4:
                source = bytes(packet[12:16])
            else:
                source = bytes(packet[8:24])
            if self._lookup(source) is not peer:
                self.drops["allowed_ips"] += 1
                return None
            return packet
        data = bytes(data)
        if data[1:4] != b"\x00\x00\x00":
            self.drops["malformed"] += 1
            return None
        if mtype == MSG_INITIATION and n == INITIATION_LEN:
            if not self._admit(data, src, now):
                return None
            consumed = hs.decrypt_initiation_static(self._identity, data)
            if consumed is None:
                self.drops["decrypt"] += 1
                return None
            peer = self._peers.get(consumed.initiator_static)
            if peer is None:
                self.drops["unknown_peer"] += 1
                return None
            if peer.tunnel.handle_consumed_initiation(data, consumed, now):
                peer.endpoint = src
            self._drain(peer, now)
            return None
        if (mtype == MSG_RESPONSE and n == RESPONSE_LEN) or (
            mtype == MSG_COOKIE_REPLY and n == COOKIE_REPLY_LEN
        ):
            if mtype == MSG_RESPONSE and not self._admit(data, src, now):
                return None
            # The receiver index (bytes 8..11 of a response, 4..7 of a cookie reply) names the
            # peer in its upper 24 bits.
            off = 9 if mtype == MSG_RESPONSE else 5
            peer = self._by_index.get(int.from_bytes(data[off : off + 3], "little"))
            if peer is None:
                self.drops["index"] += 1
                return None
            tunnel = peer.tunnel
            before = tunnel.rx_packets
            tunnel.handle_verified_handshake(data, now)
            if tunnel.rx_packets != before:
                peer.endpoint = src
            self._drain(peer, now)
            return None
        self.drops["malformed"] += 1
        return None

    def _admit(self, data: bytes, src: Endpoint, now: float) -> bool:
        if not verify_mac1(self._identity.mac1_key, data):
            self.drops["mac1"] += 1
            return False
        reply = self.rate_limiter.check(data, src, now)
        if reply is not None:
            if reply:
                self.drops["cookie"] += 1
                self._tx.append((reply, src))
                self._out_at = now
            else:
                self.drops["rate_limited"] += 1
            return False
        return True

    def _drain(self, peer: Peer, now: float) -> None:
        tunnel = peer.tunnel
        while (dg := tunnel.poll_transmit()) is not None:
            if peer.endpoint is None:
                self.drops["no_endpoint"] += 1
                continue
            self._tx.append((dg, peer.endpoint))
            self._out_at = now
        while (ev := tunnel.poll_event()) is not None:
            self._events.append((peer.public_key, ev))
            self._out_at = now

    # --------------------------------------------------------------- outputs

    def poll_transmit(self) -> tuple[bytes, Endpoint] | None:
        return self._tx.popleft() if self._tx else None

    def poll_event(self) -> tuple[bytes, TunnelEvent] | None:
        """Next (peer public key, tunnel event)."""
        return self._events.popleft() if self._events else None

    def handle_timeout(self, now: float) -> None:
        self.rate_limiter.handle_timeout(now)
        for peer in self._peers.values():
            tunnel = peer.tunnel
            deadline = tunnel.poll_timeout()
            if deadline is not None and deadline <= now:
                tunnel.handle_timeout(now)
                self._drain(peer, now)

    def poll_timeout(self) -> float | None:
        if self._tx or self._events:
            return self._out_at
        best: float | None = None
        for peer in self._peers.values():
            t = peer.tunnel.poll_timeout()
            if t is not None and (best is None or t < best):
                best = t
        return best
