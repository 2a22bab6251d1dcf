"""Many peer connections over one UDP socket per address family: ICE + TURN + WireGuard; pure.

Theory of operation
-------------------
A :class:`Node` is one client or gateway. It owns

* the socket bases (one per address family, :meth:`Node.add_local_interface`), each a host
  candidate;
* one TURN :class:`~firezone.proto.turn.client.Allocation` per relay, made as soon as the relays
  are known (:meth:`Node.update_relays`), before any connection, so that server-reflexive and
  relay candidates are ready when a connection starts;
* one connection per peer: an :class:`~firezone.proto.ice.IceAgent` (controlling on the client)
  and a WireGuard :class:`~firezone.proto.wireguard.Tunnel` (rekey attempts capped at 20 s).

Every datagram on a socket is told apart by its first bytes (RFC 7983 style):

* ``1..4`` then three zero bytes: WireGuard. Types 2-4 carry our receiver index, whose upper 24
  bits name the connection; a type 1 initiation is matched by the static key it carries;
* from a relay's address: ``0x40..0x7F`` is ChannelData (the allocation strips it and the payload
  is demultiplexed again as if it arrived on the relayed address), anything else is for the
  allocation (STUN responses, Data indications);
* a STUN message (magic cookie): Binding requests go to the connection whose local ufrag the
  USERNAME names, responses to the connection that sent the transaction.

A connection moves through::

    CONNECTING --ICE selects a pair--> (path set, buffered packets go to WireGuard)
               --WireGuard handshake completes--> CONNECTED        (ConnectionEstablished)
    CONNECTED  --another pair selected--> CONNECTED                (PathChanged)
    CONNECTED  --ICE disconnected, or the candidate in use went away-->
               RECONNECTING (packets are buffered; the controlling side restarts its checks
               with the same credentials; the controlled side waits to be nominated again)
    RECONNECTING --a pair selected--> CONNECTED                    (PathChanged)
    any        --ICE failed, reconnect deadline, WireGuard gave up--> removed (ConnectionFailed)
    any        --the peer invalidates a candidate--> both sides re-run their checks with the same
               credentials (the agent cannot forget a remote candidate otherwise); the path in
               use keeps carrying data until a new pair is selected
    any        --remove_connection()--> removed                    (ConnectionClosed)

IP packets for a connection without a path are buffered (at most ``MAX_BUFFERED`` per
connection, oldest dropped first) and handed to WireGuard once ICE selects a pair; WireGuard then
queues them until its handshake completes. The client forces a handshake as soon as a path
exists, so setup does not wait for the first packet.

A path can also die silently (UDP between the sites blocked). ICE notices only at its next
consent check (every 25 s, then ~15 s of retries) while WireGuard gives up 20 s after starting a
handshake, so the node watches WireGuard: a retransmitted initiation on an established
connection makes the controlling side re-run its checks with the same credentials, and the
controlled side, whose agent keeps its selected pair and ignores a lower-priority nomination,
answers over whatever pair authenticated WireGuard packets arrive on (WireGuard's own endpoint
rule).

When the selected pair's local candidate is a relay candidate, WireGuard datagrams leave as
ChannelData through that allocation (to the relay server); otherwise they go from the socket base
straight to the remote address.

The per-packet path (:meth:`Node.encapsulate`, :meth:`Node.handle_datagram` for WireGuard
transport data) is a dict lookup plus the tunnel call; it creates no events and logs only at
TRACE.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from firezone.logs import TRACE
from firezone.proto.ice import (
    Candidate,
    Connected,
    Disconnected,
    Failed,
    IceAgent,
    NominatedPairChanged,
    Transmit,
    path_kind,
)
from firezone.proto.ice.agent import KEEPALIVE_INTERVAL
from firezone.proto.rng import Rng
from firezone.proto.stun import is_stun
from firezone.proto.turn.client import (
    Allocation,
    AllocationFailed,
    AllocationLost,
    AllocationReady,
    AllocationState,
)
from firezone.proto.wireguard import ConnectionExpired, HandshakeCompleted, Tunnel
from firezone.proto.wireguard import handshake as hs
from firezone.proto.wireguard.cookie import verify_mac1
from firezone.proto.wireguard.keys import public_key
from firezone.proto.wireguard.timers import ICE_REKEY_ATTEMPT_TIME, REKEY_TIMEOUT

__all__ = [
    "DEFAULT_PORT",
    "ConnectionClosed",
    "ConnectionEstablished",
    "ConnectionFailed",
    "InvalidateIceCandidate",
    "NewIceCandidate",
    "Node",
    "NodeEvent",
    "PathChanged",
    "RelayInfo",
    "Transmit",
]

log = logging.getLogger(__name__)

Addr = tuple[str, int]

# Firezone sockets.rs: 49152 + 3473 ("FIRE").
DEFAULT_PORT = 52625
# Firezone connection_state.rs: WireGuard packets produced while connecting are buffered (128).
MAX_BUFFERED = 128
# RFC 8445 §14.2 leaves Ta to the application. A connection here checks a few dozen pairs at most,
# all towards one peer and its two relays, and the relayed pairs come last by priority: 20 ms
# keeps the burst small while the last pair still goes out about 100 ms after the first.
CHECK_PACING = 0.020
# How long a connection that lost its ICE path may try to get a new one: about one full ICE
# check run (12 attempts, 250 ms doubling to 1.5 s = 15.25 s) plus pacing and one RTT.
RECONNECT_TIMEOUT = 16.5
# The controlled side cannot search for a path itself; it waits for the controlling peer, which
# notices a silently dead pair only when its next consent check (every 25 s) times out.
CONTROLLED_RECONNECT_TIMEOUT = KEEPALIVE_INTERVAL + RECONNECT_TIMEOUT
# Firezone allocation.rs gives up on a request after 8 s; try a failed or lost allocation again
# after this long (doubling up to ALLOCATION_RETRY_MAX).
ALLOCATION_RETRY = 2.0
ALLOCATION_RETRY_MAX = 60.0
# Transaction ids of our own ICE checks, to route responses without asking every agent.
_MAX_TXIDS = 8192

_WG_ZERO = b"\x00\x00\x00"
_MSG_INITIATION, _MSG_RESPONSE, _MSG_COOKIE, _MSG_TRANSPORT = 1, 2, 3, 4
_INITIATION_LEN = 148
_PATHS = ("host", "srflx", "relay")


# --- public values -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """A relay the portal told us to use, with the TURN credentials it minted for us."""

    id: str
    addr: Addr
    username: str
    password: str
    realm: str = "firezone"

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("relay id must be non-empty")
        if not self.username or not self.password:
            raise ValueError("relay credentials must be non-empty")


class NodeEvent:
    """Base class of everything :meth:`Node.poll_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class NewIceCandidate(NodeEvent):
    """A local candidate to signal to ``peer_id`` through the portal."""

    peer_id: str
    sdp: str


@dataclass(frozen=True, slots=True)
class InvalidateIceCandidate(NodeEvent):
    """A local candidate ``peer_id`` should forget (its allocation or interface is gone)."""

    peer_id: str
    sdp: str


@dataclass(frozen=True, slots=True)
class ConnectionEstablished(NodeEvent):
    """ICE selected a path and the WireGuard handshake completed: data can flow."""

    peer_id: str
    path: str
    rtt: float | None

    def __post_init__(self) -> None:
        if self.path not in _PATHS:
            raise ValueError(f"unknown path kind {self.path!r}")


@dataclass(frozen=True, slots=True)
class PathChanged(NodeEvent):
    """An established connection moved to another candidate pair."""

    peer_id: str
    path: str
    rtt: float | None

    def __post_init__(self) -> None:
        if self.path not in _PATHS:
            raise ValueError(f"unknown path kind {self.path!r}")


@dataclass(frozen=True, slots=True)
class ConnectionFailed(NodeEvent):
    """The connection is gone: no path could be found or WireGuard gave up."""

    peer_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(NodeEvent):
    """The connection was removed by :meth:`Node.remove_connection`."""

    peer_id: str


# --- internals -----------------------------------------------------------------------------------


def _family(addr: Addr) -> int:
    return 6 if ":" in addr[0] else 4


@dataclass(slots=True)
class _Relay:
    info: RelayInfo
    alloc: Allocation | None = None
    retry_at: float | None = None
    backoff: float = ALLOCATION_RETRY
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(slots=True)
class _Conn:
    peer_id: str
    peer_public: bytes
    psk: bytes | None
    local_creds: tuple[str, str]
    remote_creds: tuple[str, str]
    agent: IceAgent
    tunnel: Tunnel
    index: int
    created_at: float
    # Signalled remote candidates, by address (re-added after an ICE restart of our own).
    remote: dict[Addr, Candidate] = field(default_factory=dict)
    invalid_remotes: set[Addr] = field(default_factory=set)
    # The selected path: WireGuard goes from ``src`` to ``dst``, or through ``alloc`` to ``dst``.
    kind: str | None = None
    src: Addr | None = None
    dst: Addr | None = None
    alloc: Allocation | None = None
    rtt: float | None = None
    # Where the last WireGuard handshake message came from: the reply path before ICE selects one.
    last_handshake_from: tuple[Addr, Addr] | None = None
    established: bool = False  # ConnectionEstablished was reported
    handshakes: int = 0
    handshake_forced: bool = False
    last_initiation_at: float | None = None
    agent_path: tuple[Addr, Addr] | None = None  # (base, remote) of the agent's last selection
    distress_at: float | None = None
    reconnect_deadline: float | None = None
    buffer: deque[bytes] = field(default_factory=deque)
    buffer_dropped: int = 0

    @property
    def state(self) -> str:
        if self.reconnect_deadline is not None:
            return "reconnecting"
        if self.established:
            return "connected"
        return "connecting"


class Node:
    """One client or gateway: many peers over one socket per family; see the module docstring."""

    def __init__(
        self, *, private_key: bytes, rng: Rng, now: float, unix_time: float, is_client: bool
    ) -> None:
        self._identity = hs.LocalIdentity(private_key)
        self._private = private_key
        self.public_key: bytes = public_key(private_key)
        self._rng = rng
        self._unix_offset = unix_time - now
        self.is_client = is_client
        self._now = now
        self._interfaces: dict[int, Addr] = {}
        self._relays: dict[str, _Relay] = {}
        self._alloc_by_server: dict[Addr, Allocation] = {}
        self._alloc_by_relayed: dict[Addr, Allocation] = {}
        self._candidates: list[Candidate] = []  # every local candidate we signal
        self._conns: dict[str, _Conn] = {}
        self._by_index: dict[int, _Conn] = {}
        self._by_key: dict[bytes, _Conn] = {}
        self._by_ufrag: dict[str, _Conn] = {}
        self._txids: dict[bytes, str] = {}
        self._transmits: deque[Transmit] = deque()
        self._events: deque[NodeEvent] = deque()
        self.stats_counters: dict[str, int] = {}

    # --- helpers ------------------------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.stats_counters[what] = self.stats_counters.get(what, 0) + 1

    def _tick(self, now: float) -> None:
        self._now = max(self._now, now)

    # --- interfaces and relays ---------------------------------------------------------------
    def add_local_interface(self, addr: Addr, now: float) -> None:
        """Use ``addr`` as the socket base of its family (a host candidate); replaces an old one."""
        self._tick(now)
        cand = Candidate.host(addr)
        fam = _family(addr)
        old = self._interfaces.get(fam)
        if old == cand.addr:
            return
        if old is not None:
            log.debug("local interface changed", extra={"old": old, "new": addr})
            gone = [c for c in self._candidates if c.base == old]  # the host and its srflx
            for c in gone:
                self._invalidate(c)
            self._local_base_gone(old, now)
            for relay in self._relays.values():
                if relay.alloc is not None and relay.alloc.local == old:
                    self._drop_allocation(relay, now, free=True)
        self._interfaces[fam] = cand.addr
        self._add_candidate(cand)
        for relay in self._relays.values():
            if relay.alloc is None and _family(relay.info.addr) == fam:
                self._allocate(relay, now)
        self._drain_conns(now)

    def update_relays(self, relays: list[RelayInfo], now: float) -> None:
        """Allocate on new relays at once, free removed ones, re-allocate on new credentials."""
        self._tick(now)
        wanted = {r.id: r for r in relays}
        for rid in [rid for rid in self._relays if rid not in wanted]:
            gone = self._relays.pop(rid)
            log.debug("relay removed", extra={"relay": rid})
            self._drop_allocation(gone, now, free=True)
        for rid, info in wanted.items():
            relay = self._relays.get(rid)
            if relay is None:
                relay = self._relays[rid] = _Relay(info)
                self._allocate(relay, now)
                continue
            old = relay.info
            relay.info = info
            if old == info:
                continue
            if (old.addr, old.realm) != (info.addr, info.realm) or relay.alloc is None:
                self._drop_allocation(relay, now, free=True)
                self._allocate(relay, now)
            else:
                log.debug("relay credentials changed", extra={"relay": rid})
                relay.backoff = ALLOCATION_RETRY
                relay.retry_at = None
                relay.alloc.update_credentials(info.username, info.password, now)
                self._drain_alloc(relay.alloc, now)
        self._drain_conns(now)

    def _allocate(self, relay: _Relay, now: float) -> None:
        base = self._interfaces.get(_family(relay.info.addr))
        if base is None:
            return  # allocated once an interface of that family appears
        info = relay.info
        alloc = Allocation(
            server=info.addr,
            username=info.username,
            password=info.password,
            realm=info.realm,
            rng=self._rng,
            now=now,
            local=base,
        )
        relay.alloc = alloc
        relay.retry_at = None
        self._alloc_by_server[info.addr] = alloc
        self._drain_alloc(alloc, now)

    def _drop_allocation(self, relay: _Relay, now: float, *, free: bool) -> None:
        alloc = relay.alloc
        if alloc is None:
            return
        relay.alloc = None
        relay.retry_at = None
        if free:
            alloc.free(now)
            while (t := alloc.poll_transmit()) is not None:
                self._transmits.append(t)
        if self._alloc_by_server.get(alloc.server) is alloc:
            del self._alloc_by_server[alloc.server]
        self._forget_relay_candidates(relay, now)

    def _forget_relay_candidates(self, relay: _Relay, now: float) -> None:
        for c in relay.candidates:
            self._alloc_by_relayed.pop(c.addr, None)
            self._local_base_gone(c.base, now)
            self._invalidate(c)
        relay.candidates = []

    def _local_base_gone(self, base: Addr, now: float) -> None:
        for conn in list(self._conns.values()):
            conn.agent.remove_local_candidate(base, now)
            if conn.src == base:
                # After an ICE restart the path in use need not be the agent's selection, so
                # the agent would not report it lost.
                self._clear_path(conn, now)

    def _relay_of(self, alloc: Allocation) -> _Relay | None:
        for relay in self._relays.values():
            if relay.alloc is alloc:
                return relay
        return None

    # --- local candidates ------------------------------------------------------------------------
    def _add_candidate(self, c: Candidate) -> None:
        if any(x.kind == c.kind and x.addr == c.addr for x in self._candidates):
            return
        self._candidates.append(c)
        sdp = c.to_sdp()
        for conn in self._conns.values():
            conn.agent.add_local_candidate(c)
            self._events.append(NewIceCandidate(conn.peer_id, sdp))

    def _invalidate(self, c: Candidate) -> None:
        if c not in self._candidates:
            return
        self._candidates.remove(c)
        sdp = c.to_sdp()
        for conn in self._conns.values():
            self._events.append(InvalidateIceCandidate(conn.peer_id, sdp))

    @property
    def local_candidates(self) -> list[Candidate]:
        """Every local candidate (host, server-reflexive, relay) currently signalled."""
        return list(self._candidates)

    # --- connections ------------------------------------------------------------------------------
    def upsert_connection(
        self,
        peer_id: str,
        *,
        peer_public_key: bytes,
        preshared_key: bytes | None,
        local_creds: tuple[str, str],
        remote_creds: tuple[str, str],
        now: float,
    ) -> None:
        """Create the connection to ``peer_id``; new ICE credentials restart ICE, new keys replace it."""
        self._tick(now)
        conn = self._conns.get(peer_id)
        if conn is not None:
            if conn.peer_public == peer_public_key and conn.psk == preshared_key:
                if (conn.local_creds, conn.remote_creds) == (local_creds, remote_creds):
                    return
                log.debug("ICE credentials changed, restarting", extra={"peer": peer_id})
                self._by_ufrag.pop(conn.local_creds[0], None)
                conn.local_creds, conn.remote_creds = local_creds, remote_creds
                conn.agent.restart(*local_creds, *remote_creds, now)
                self._by_ufrag[local_creds[0]] = conn
                conn.remote.clear()
                conn.invalid_remotes.clear()
                for c in self._candidates:
                    self._events.append(NewIceCandidate(peer_id, c.to_sdp()))
                self._drain_conn(conn, now)
                return
            self._forget(conn)
        agent = IceAgent(
            controlling=self.is_client,
            local_ufrag=local_creds[0],
            local_pwd=local_creds[1],
            remote_ufrag=remote_creds[0],
            remote_pwd=remote_creds[1],
            rng=self._rng,
            now=now,
            ta=CHECK_PACING,
        )
        index = self._new_index()
        try:
            tunnel = Tunnel(
                static_private=self._private,
                peer_public=peer_public_key,
                preshared_key=preshared_key,
                index=index,
                rng=self._rng,
                now=now,
                unix_time=self._unix_offset + now,
                rekey_attempt_time=ICE_REKEY_ATTEMPT_TIME,
                identity=self._identity,
            )
        except ValueError:
            # A key the portal relayed that X25519 rejects (wrong length, low-order point).
            self._count("bad_peer_key")
            self._events.append(ConnectionFailed(peer_id, "invalid peer public key"))
            return
        conn = _Conn(
            peer_id,
            peer_public_key,
            preshared_key,
            local_creds,
            remote_creds,
            agent,
            tunnel,
            index,
            now,
        )
        self._conns[peer_id] = conn
        self._by_index[index] = conn
        self._by_key[peer_public_key] = conn
        self._by_ufrag[local_creds[0]] = conn
        for c in self._candidates:
            agent.add_local_candidate(c)
            self._events.append(NewIceCandidate(peer_id, c.to_sdp()))
        log.debug("connection created", extra={"peer": peer_id, "controlling": self.is_client})
        self._drain_conn(conn, now)

    def _new_index(self) -> int:
        while True:
            idx = self._rng.randbelow(1 << 24)
            if idx not in self._by_index:
                return idx

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.peer_id, None)
        if self._by_index.get(conn.index) is conn:
            del self._by_index[conn.index]
        if self._by_key.get(conn.peer_public) is conn:
            del self._by_key[conn.peer_public]
        if self._by_ufrag.get(conn.local_creds[0]) is conn:
            del self._by_ufrag[conn.local_creds[0]]

    def remove_connection(self, peer_id: str, now: float) -> None:
        """Drop the connection to ``peer_id`` (ConnectionClosed); unknown peers are ignored."""
        self._tick(now)
        conn = self._conns.get(peer_id)
        if conn is None:
            return
        self._forget(conn)
        self._events.append(ConnectionClosed(peer_id))
        log.debug("connection closed", extra={"peer": peer_id})

    def _fail(self, conn: _Conn, reason: str) -> None:
        if self._conns.get(conn.peer_id) is not conn:
            return
        self._forget(conn)
        self._events.append(ConnectionFailed(conn.peer_id, reason))
        log.debug("connection failed", extra={"peer": conn.peer_id, "reason": reason})

    def add_remote_candidate(self, peer_id: str, sdp: str, now: float) -> None:
        """A candidate of ``peer_id`` signalled through the portal; bad ones are dropped."""
        self._tick(now)
        conn = self._conns.get(peer_id)
        if conn is None:
            self._count("candidate_unknown_peer")
            return
        try:
            c = Candidate.from_sdp(sdp)
        except ValueError:
            self._count("candidate_malformed")
            log.debug("malformed remote candidate dropped", extra={"peer": peer_id})
            return
        if c.addr in conn.remote:
            return
        conn.remote[c.addr] = c
        conn.invalid_remotes.discard(c.addr)
        conn.agent.add_remote_candidate(c, now)
        self._drain_conn(conn, now)

    def remove_remote_candidate(self, peer_id: str, sdp: str, now: float) -> None:
        """``peer_id`` invalidated a candidate; if our path uses it, look for a new one."""
        self._tick(now)
        conn = self._conns.get(peer_id)
        if conn is None:
            return
        try:
            c = Candidate.from_sdp(sdp)
        except ValueError:
            self._count("candidate_malformed")
            return
        if conn.remote.pop(c.addr, None) is None:
            return
        conn.invalid_remotes.add(c.addr)
        if conn.dst == c.addr:
            self._clear_path(conn, now)  # buffer instead of sending into the dead path
        # The agent cannot forget a remote candidate: its succeeded pairs would stay "valid" and
        # be nominated or selected again later. Re-running the checks with the same credentials
        # (the peer keeps answering them) drops them. The data path in use, if still alive,
        # carries on meanwhile; the next selection replaces it.
        self._restart_checks(conn, now)
        self._drain_conn(conn, now)

    def _restart_checks(self, conn: _Conn, now: float) -> None:
        log.debug("restarting ICE checks", extra={"peer": conn.peer_id})
        conn.agent.restart(*conn.local_creds, *conn.remote_creds, now)
        for c in conn.remote.values():
            conn.agent.add_remote_candidate(c, now)

    # --- data path -----------------------------------------------------------------------------------
    def encapsulate(self, peer_id: str, packet: bytes, now: float) -> Transmit | None:
        """Encrypt an IP packet for ``peer_id``; None when it was buffered or dropped."""
        conn = self._conns.get(peer_id)
        if conn is None:
            self._count("encapsulate_unknown_peer")
            return None
        if conn.dst is None:
            if len(conn.buffer) >= MAX_BUFFERED:
                conn.buffer.popleft()
                conn.buffer_dropped += 1
            conn.buffer.append(bytes(packet))
            return None
        tunnel = conn.tunnel
        out = tunnel.encapsulate(packet, now)
        if (d := tunnel.poll_transmit()) is not None:  # the packet started a rekey
            self._send_wg(conn, d, now)
            self._drain_tunnel(conn, now)
        if out is None:
            return None
        alloc = conn.alloc
        if alloc is None:
            return Transmit(conn.src, conn.dst, out)
        data = alloc.encode_to_peer(conn.dst, out, now)
        if data is None:
            self._drain_alloc(alloc, now)
            return None
        return Transmit(alloc.local, alloc.server, data)

    def handle_datagram(
        self, local: Addr, remote: Addr, data: bytes, now: float
    ) -> tuple[str, bytes] | None:
        """Feed a datagram from ``remote`` received on ``local``; returns a packet for the TUN."""
        n = len(data)
        if n >= 4 and 1 <= data[0] <= 4 and data[1:4] == _WG_ZERO:
            return self._handle_wg(local, remote, data, now)
        self._tick(now)
        if n == 0:
            self._count("empty")
            return None
        alloc = self._alloc_by_server.get(remote)
        if alloc is not None:
            if 0x40 <= data[0] <= 0x7F:
                got = alloc.decapsulate(data, remote)
                if got is None:
                    self._count("channel_data_dropped")
                    return None
                peer, payload = got
                return self._handle_relayed(alloc, peer, payload, now)
            alloc.handle_input(data, remote, now)
            result = None
            while (pd := alloc.poll_peer_data()) is not None:
                r = self._handle_relayed(alloc, pd[0], pd[1], now)
                if r is not None:
                    result = r
            if self._drain_alloc(alloc, now):
                self._drain_conns(now)  # candidates changed under every agent
            return result
        if is_stun(data):
            self._handle_stun(local, remote, data, now)
            return None
        self._count("unknown_datagram")
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "unknown datagram dropped", extra={"src": remote, "len": n})
        return None

    def _handle_relayed(
        self, alloc: Allocation, peer: Addr, payload: bytes | memoryview, now: float
    ) -> tuple[str, bytes] | None:
        relayed = self._relayed_addr(alloc, peer)
        if relayed is None:
            self._count("relayed_without_address")
            return None
        if len(payload) >= 4 and 1 <= payload[0] <= 4 and payload[1:4] == _WG_ZERO:
            return self._handle_wg(relayed, peer, payload, now)
        data = bytes(payload)
        if is_stun(data):
            self._handle_stun(relayed, peer, data, now)
        else:
            self._count("unknown_relayed")
        return None

    @staticmethod
    def _relayed_addr(alloc: Allocation, peer: Addr) -> Addr | None:
        addrs = alloc.relayed_addrs
        if not addrs:
            return None
        fam = _family(peer)
        for a in addrs:
            if _family(a) == fam:
                return a
        return addrs[0]

    def _handle_wg(
        self, local: Addr, remote: Addr, data: bytes | memoryview, now: float
    ) -> tuple[str, bytes] | None:
        mtype = data[0]
        if mtype == _MSG_TRANSPORT:
            conn = self._by_index.get(int.from_bytes(data[5:8], "little"))
            if conn is None:
                self._count("wg_unknown_index")
                return None
            tunnel = conn.tunnel
            packet = tunnel.decapsulate(data, now)
            # A confirmed session flushes its queue; a rekey sends an initiation. Events
            # (HandshakeCompleted) make the tunnel's poll_timeout "now", so handle_timeout
            # picks them up without a second call per packet here.
            if (d := tunnel.poll_transmit()) is not None:
                self._tick(now)
                self._send_wg(conn, d, now)
                self._drain_tunnel(conn, now)
            if packet is None:
                return None
            if (remote != conn.dst or local != conn.src) and not self.is_client:
                self._follow_peer(conn, local, remote, now)
            return conn.peer_id, packet
        self._tick(now)
        if mtype == _MSG_INITIATION:
            raw = bytes(data)
            if len(raw) != _INITIATION_LEN or not verify_mac1(self._identity.mac1_key, raw):
                self._count("wg_bad_initiation")
                return None
            consumed = hs.decrypt_initiation_static(self._identity, raw)
            if consumed is None:
                self._count("wg_bad_initiation")
                return None
            conn = self._by_key.get(consumed.initiator_static)
            if conn is None:
                self._count("wg_unknown_peer")
                return None
            conn.last_handshake_from = (local, remote)
            answered = conn.tunnel.handle_consumed_initiation(raw, consumed, now)
            if (
                answered
                and not self.is_client
                and conn.established
                and (remote != conn.dst or local != conn.src)
            ):
                self._follow_peer(conn, local, remote, now)  # before the response goes out
        else:
            # Response: receiver index at bytes 8..11; cookie reply: at 4..7.
            off = 9 if mtype == _MSG_RESPONSE else 5
            conn = self._by_index.get(int.from_bytes(data[off : off + 3], "little"))
            if conn is None:
                self._count("wg_unknown_index")
                return None
            conn.last_handshake_from = (local, remote)
            conn.tunnel.decapsulate(data, now, remote)
        self._drain_tunnel(conn, now)
        return None

    def _handle_stun(self, local: Addr, remote: Addr, data: bytes, now: float) -> None:
        conn: _Conn | None = None
        if len(data) >= 20 and data[0] == 0x00 and data[1] == 0x01:
            ufrag = _request_ufrag(data)
            if ufrag is not None:
                conn = self._by_ufrag.get(ufrag)
        else:
            pid = self._txids.pop(bytes(data[8:20]), None)
            if pid is not None:
                conn = self._conns.get(pid)
        if conn is None:
            self._count("stun_unmatched")
            return
        conn.agent.handle_stun(data, local, remote, now)
        self._drain_conn(conn, now)

    # --- outputs -----------------------------------------------------------------------------------
    def poll_transmit(self) -> Transmit | None:
        """The next datagram to send (``src`` is the socket base to send it from)."""
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> NodeEvent | None:
        """The next event: candidates to signal, connection established / changed / failed / closed."""
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """The next instant :meth:`handle_timeout` has work (``now`` while output is queued)."""
        if self._transmits or self._events:
            return self._now
        best: float | None = None
        for relay in self._relays.values():
            t = relay.retry_at
            if t is None and relay.alloc is not None:
                t = relay.alloc.poll_timeout()
            if t is not None and (best is None or t < best):
                best = t
        for conn in self._conns.values():
            for t in (
                conn.agent.poll_timeout(),
                conn.tunnel.poll_timeout(),
                conn.reconnect_deadline,
            ):
                if t is not None and (best is None or t < best):
                    best = t
        return best

    def handle_timeout(self, now: float) -> None:
        """Advance every allocation, ICE agent and tunnel whose deadline has come."""
        self._tick(now)
        for relay in list(self._relays.values()):
            if relay.retry_at is not None and now >= relay.retry_at:
                relay.retry_at = None
                self._retry_allocation(relay, now)
            alloc = relay.alloc
            if alloc is not None:
                t = alloc.poll_timeout()
                if t is not None and t <= now:
                    alloc.handle_timeout(now)
                    self._drain_alloc(alloc, now)
        for conn in list(self._conns.values()):
            if conn.reconnect_deadline is not None and now >= conn.reconnect_deadline:
                self._fail(conn, "no path after ICE disconnect")
                continue
            t = conn.agent.poll_timeout()
            if t is not None and t <= now:
                conn.agent.handle_timeout(now)
            t = conn.tunnel.poll_timeout()
            if t is not None and t <= now:
                conn.tunnel.handle_timeout(now)
            self._drain_conn(conn, now)
        if len(self._txids) > _MAX_TXIDS:
            for k in list(self._txids)[: _MAX_TXIDS // 2]:
                del self._txids[k]

    def _retry_allocation(self, relay: _Relay, now: float) -> None:
        alloc = relay.alloc
        if alloc is None:
            self._allocate(relay, now)
            return
        if alloc.state in (AllocationState.FAILED, AllocationState.LOST):
            info = relay.info
            # Same credentials on a failed or lost allocation: a fresh Allocate.
            alloc.update_credentials(info.username, info.password, now)
            self._drain_alloc(alloc, now)

    # --- draining children -------------------------------------------------------------------------
    def _drain_alloc(self, alloc: Allocation, now: float) -> bool:
        """Forward the allocation's output; True when it had events (candidates changed)."""
        relay = self._relay_of(alloc)
        had_events = False
        while (ev := alloc.poll_event()) is not None:
            had_events = True
            if relay is None or relay.alloc is not alloc:
                continue
            if isinstance(ev, AllocationReady):
                relay.backoff = ALLOCATION_RETRY
                self._forget_relay_candidates(relay, now)
                base = alloc.local
                if ev.srflx is not None and base is not None:
                    srflx = Candidate.server_reflexive(ev.srflx, base, alloc.server)
                    if not any(c.addr == srflx.addr for c in self._candidates):
                        self._add_candidate(srflx)
                for r in ev.relayed_addrs:
                    c = Candidate.relayed(r, alloc.server, ev.srflx)
                    relay.candidates.append(c)
                    self._alloc_by_relayed[r] = alloc
                    self._add_candidate(c)
                log.debug("relay candidates ready", extra={"relay": relay.info.id})
            elif isinstance(ev, AllocationLost):
                log.debug("allocation lost", extra={"relay": relay.info.id, "reason": ev.reason})
                self._forget_relay_candidates(relay, now)
                if ev.reason != "credentials changed":  # update_credentials re-allocates itself
                    self._schedule_retry(relay, now)
            elif isinstance(ev, AllocationFailed):
                log.debug("allocation failed", extra={"relay": relay.info.id, "code": ev.code})
                self._forget_relay_candidates(relay, now)
                self._schedule_retry(relay, now)
        while (t := alloc.poll_transmit()) is not None:
            self._transmits.append(t)
        return had_events

    def _schedule_retry(self, relay: _Relay, now: float) -> None:
        relay.retry_at = now + relay.backoff
        relay.backoff = min(relay.backoff * 2, ALLOCATION_RETRY_MAX)

    def _drain_conns(self, now: float) -> None:
        for conn in list(self._conns.values()):
            self._drain_conn(conn, now)

    def _drain_conn(self, conn: _Conn, now: float) -> None:
        if self._conns.get(conn.peer_id) is not conn:
            return
        agent = conn.agent
        while (t := agent.poll_transmit()) is not None:
            p = t.payload
            if len(p) >= 20 and p[0] == 0x00 and p[1] == 0x01:  # a Binding request of ours
                self._txids[p[8:20]] = conn.peer_id
            alloc = self._alloc_by_relayed.get(t.src) if t.src is not None else None
            if alloc is None:
                self._transmits.append(t)
                continue
            data = alloc.encode_to_peer(t.dst, p, now)
            if data is not None:
                self._transmits.append(Transmit(alloc.local, alloc.server, data))
            else:
                self._drain_alloc(alloc, now)
        while (ev := agent.poll_event()) is not None:
            if isinstance(ev, (Connected, NominatedPairChanged)):
                self._on_selected(conn, ev.local, ev.remote, ev.rtt, now)
            elif isinstance(ev, Disconnected):
                self._on_disconnected(conn, now)
            elif isinstance(ev, Failed):
                self._fail(conn, f"ICE failed: {ev.reason}")
                return
        self._drain_tunnel(conn, now)

    def _drain_tunnel(self, conn: _Conn, now: float) -> None:
        tunnel = conn.tunnel
        while (d := tunnel.poll_transmit()) is not None:
            self._send_wg(conn, d, now)
        while (ev := tunnel.poll_event()) is not None:
            if isinstance(ev, HandshakeCompleted):
                conn.handshakes += 1
                if not conn.established and conn.dst is not None:
                    conn.established = True
                    assert conn.kind is not None
                    self._events.append(ConnectionEstablished(conn.peer_id, conn.kind, conn.rtt))
                    log.debug(
                        "connection established",
                        extra={"peer": conn.peer_id, "path": conn.kind, "rtt": conn.rtt},
                    )
            elif isinstance(ev, ConnectionExpired) and ev.reason == "handshake_timeout":
                self._fail(conn, "WireGuard handshake timed out")
                return

    def _send_wg(self, conn: _Conn, datagram: bytes, now: float) -> None:
        dst: Addr
        src: Addr | None
        if datagram[0] == _MSG_INITIATION and self.is_client:
            self._initiation_sent(conn, now)
        if conn.dst is None:
            if conn.last_handshake_from is None:
                self._count("wg_no_path")
                return
            local, remote = conn.last_handshake_from
            alloc = self._alloc_by_relayed.get(local)
            dst, src = remote, local
        else:
            alloc, dst, src = conn.alloc, conn.dst, conn.src
        if alloc is None:
            self._transmits.append(Transmit(src, dst, datagram))
            return
        data = alloc.encode_to_peer(dst, datagram, now)
        if data is not None:
            self._transmits.append(Transmit(alloc.local, alloc.server, data))
        else:
            self._drain_alloc(alloc, now)

    def _follow_peer(self, conn: _Conn, local: Addr, remote: Addr, now: float) -> None:
        """Controlled side: authenticated WireGuard arrived over another pair; answer over it.

        The controlling peer moved (its ICE re-checked the paths), but our agent keeps a
        selected pair until its consent checks fail and ignores a nomination of lower priority;
        WireGuard's own rule (reply to where authenticated packets come from) bridges that.
        """
        alloc = self._alloc_by_relayed.get(local)
        if alloc is None and local not in self._interfaces.values():
            return
        rc = conn.remote.get(remote)
        if alloc is not None or (rc is not None and rc.kind == "relay"):
            kind = "relay"
        elif rc is not None and rc.kind == "host":
            kind = "host"
        else:
            kind = "srflx"
        was_reconnecting = conn.reconnect_deadline is not None
        conn.kind, conn.src, conn.dst, conn.alloc = kind, local, remote, alloc
        conn.reconnect_deadline = None
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "following the peer's path", extra={"peer": conn.peer_id, "dst": remote})
        if conn.established:
            self._events.append(PathChanged(conn.peer_id, kind, conn.rtt))
        if was_reconnecting or conn.buffer:
            self._flush_buffer(conn, now)

    def _initiation_sent(self, conn: _Conn, now: float) -> None:
        """A retransmitted initiation on an established path: suspect the path, re-check ICE.

        A path that dies silently is noticed by ICE only at the next consent check (every
        25 s, then about 15 s of retries), while WireGuard gives up 20 s after it starts a
        handshake; an unanswered initiation is the earlier sign.
        """
        prev, conn.last_initiation_at = conn.last_initiation_at, now
        if (
            conn.established
            and conn.dst is not None
            and prev is not None
            and now - prev <= REKEY_TIMEOUT + 1.0
            and (conn.distress_at is None or now - conn.distress_at >= ICE_REKEY_ATTEMPT_TIME)
        ):
            conn.distress_at = now
            log.debug(
                "WireGuard handshake unanswered, re-checking paths", extra={"peer": conn.peer_id}
            )
            self._restart_checks(conn, now)

    def _on_selected(
        self, conn: _Conn, local: Candidate, remote: Candidate, rtt: float | None, now: float
    ) -> None:
        kind = path_kind(local, remote)
        alloc = self._alloc_by_relayed.get(local.base) if local.kind == "relay" else None
        if local.kind == "relay" and alloc is None:
            self._count("selected_relay_without_allocation")  # freed in the meantime
            return
        changed = conn.dst is not None and (conn.src, conn.dst) != (local.base, remote.addr)
        conn.kind = kind
        conn.src = local.base
        conn.dst = remote.addr
        conn.alloc = alloc
        conn.rtt = rtt
        was_reconnecting = conn.reconnect_deadline is not None
        conn.reconnect_deadline = None
        log.debug("path selected", extra={"peer": conn.peer_id, "path": kind, "dst": remote.addr})
        conn.agent_path = (local.base, remote.addr)
        tunnel = conn.tunnel
        if conn.established and (changed or was_reconnecting):
            self._events.append(PathChanged(conn.peer_id, kind, rtt))
        elif not conn.established and tunnel.is_established:
            # The handshake finished over the path the peer used before ICE selected ours.
            conn.established = True
            self._events.append(ConnectionEstablished(conn.peer_id, kind, rtt))
        self._flush_buffer(conn, now)
        if (
            self.is_client
            and not conn.handshake_forced
            and not tunnel.is_established
            and not tunnel.queued_packets
        ):
            # Once: a second initiation within 20 ms would be rate-limited by the peer and
            # would orphan the first one's response.
            conn.handshake_forced = True
            tunnel.force_handshake(now)
        self._drain_tunnel(conn, now)

    def _flush_buffer(self, conn: _Conn, now: float) -> None:
        tunnel = conn.tunnel
        while conn.buffer:
            out = tunnel.encapsulate(conn.buffer.popleft(), now)
            if out is not None:
                self._send_wg(conn, out, now)

    def _on_disconnected(self, conn: _Conn, now: float) -> None:
        log.debug("ICE disconnected", extra={"peer": conn.peer_id})
        if conn.agent.controlling or conn.dst is None or (conn.src, conn.dst) == conn.agent_path:
            # (A controlled node that follows the peer's WireGuard elsewhere keeps that path.)
            self._clear_path(conn, now)
        if conn.agent.controlling:
            self._restart_checks(conn, now)

    @staticmethod
    def _clear_path(conn: _Conn, now: float) -> None:
        conn.dst = conn.src = conn.kind = None
        conn.alloc = None
        if conn.reconnect_deadline is None:
            wait = RECONNECT_TIMEOUT if conn.agent.controlling else CONTROLLED_RECONNECT_TIMEOUT
            conn.reconnect_deadline = now + wait

    # --- queries -------------------------------------------------------------------------------------
    def connections(self) -> list[str]:
        """Peer ids of every live connection."""
        return list(self._conns)

    def stats(self, peer_id: str) -> dict[str, object]:
        """Path, RTT, bytes and state of one connection (``KeyError`` if unknown)."""
        conn = self._conns[peer_id]
        return {
            "state": conn.state,
            "path": conn.kind,
            "rtt": conn.rtt,
            "local": conn.src,
            "remote": conn.dst,
            "rx_bytes": conn.tunnel.rx_bytes,
            "tx_bytes": conn.tunnel.tx_bytes,
            "buffered": len(conn.buffer),
            "buffer_dropped": conn.buffer_dropped,
            "wg_established": conn.tunnel.is_established,
            "wg_handshakes": conn.handshakes,
            "wg_drops": dict(conn.tunnel.drops),
        }


def _request_ufrag(data: bytes) -> str | None:
    """Our ufrag from a Binding request's USERNAME (``ours:theirs``) without a full parse."""
    end = min(len(data), 20 + ((data[2] << 8) | data[3]))
    i = 20
    while i + 4 <= end:
        atype = (data[i] << 8) | data[i + 1]
        alen = (data[i + 2] << 8) | data[i + 3]
        if atype == 0x0006:  # USERNAME
            raw = bytes(data[i + 4 : i + 4 + alen])
            try:
                return raw.decode().split(":", 1)[0]
            except UnicodeDecodeError:
                return None
        i += 4 + ((alen + 3) & ~3)
    return None
