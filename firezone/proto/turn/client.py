"""The client side of one TURN allocation (RFC 8656) on one relay; pure.

Theory of operation
-------------------
States::

    ALLOCATING --401 (realm, nonce)--> ALLOCATING (authenticated retry)
    ALLOCATING --success--> READY --Refresh / ChannelBind / Binding keepalive--> READY
    ALLOCATING --error or 8 s without answer--> FAILED          (AllocationFailed)
    READY --refresh fails, 437, or keepalive unanswered for 8 s--> LOST   (AllocationLost)
    any --free()--> FREED ; any but FREED --update_credentials()--> ALLOCATING

Every request is a STUN transaction sent again each second and abandoned after 8 s (Firezone's
allocation timings). A 438 Stale Nonce retries once with the new nonce. The allocation is
refreshed at half its lifetime; a Binding request every 25 s keeps the NAT mapping towards the
relay open and notices a dead relay.

Peers are reached over channels (0x4000-0x4FFF): :meth:`bind_channel` sends ChannelBind, which
also installs the permission for the peer's IP. A binding lasts 10 min; it is renewed after
4.5 min because the permission the binding installs lasts only 5 min (RFC 8656 §9, §12).
:meth:`encode_to_peer` frames a payload as ChannelData once the channel is bound; with ``now``
given, it binds the channel itself and queues up to a few payloads until the binding succeeds.

Data from peers arrives as ChannelData or Data indications; :meth:`handle_input` consumes both
and queues ``(peer, payload)`` for :meth:`poll_peer_data`; :meth:`decapsulate` is the ChannelData
fast path for drivers.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field

from firezone.logs import TRACE
from firezone.proto.ice.types import Transmit
from firezone.proto.rng import Rng
from firezone.proto.stun import (
    Attr,
    Class,
    ErrorCode,
    Message,
    Method,
    encode_channel_data,
    is_channel_data,
    is_stun,
    long_term_key,
    parse_message,
    verify_integrity,
)

log = logging.getLogger(__name__)

Addr = tuple[str, int]

# Firezone allocation.rs: each request is retried every second and abandoned after 8 s.
REQUEST_RTO = 1.0
REQUEST_GIVE_UP = 8.0
# Firezone BINDING_INTERVAL: keep the NAT mapping to the relay alive and detect relay loss.
BINDING_INTERVAL = 25.0
# RFC 8656 §7.2: default allocation lifetime 600 s.
DEFAULT_LIFETIME = 600
# RFC 8656 §12: channel numbers 0x4000-0x4FFF, bindings last 10 minutes.
CHANNEL_FIRST, CHANNEL_LAST = 0x4000, 0x4FFF
CHANNEL_LIFETIME = 600.0
# Firezone rebinds after 5 min; the permission a binding installs lasts 300 s (RFC 8656 §9), so
# renew a little earlier to never leave a gap where the relay drops the peer's packets.
CHANNEL_REBIND_AFTER = 270.0
# UDP (RFC 8656 §18.8: REQUESTED-TRANSPORT carries the IP protocol number).
TRANSPORT_UDP = 17
FAMILY_IPV6 = 0x02
# Payloads held per peer while its channel is being bound.
MAX_PENDING_PER_PEER = 32
# A relay that answers ChannelBind with 403 refuses that peer by policy (RFC 8656 §12: e.g. a
# peer address it does not relay to); asking again at once would only repeat the refusal.
CHANNEL_REFUSED_BACKOFF = 60.0


class AllocationState(enum.Enum):
    ALLOCATING = "allocating"
    READY = "ready"
    FAILED = "failed"
    LOST = "lost"
    FREED = "freed"


class AllocationEvent:
    """Base class of everything :meth:`Allocation.poll_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class AllocationReady(AllocationEvent):
    """The relay allocated ``relayed_addrs``; ``srflx`` is our address as the relay saw it."""

    server: Addr
    relayed_addrs: tuple[Addr, ...]
    srflx: Addr | None
    lifetime: int

    def __post_init__(self) -> None:
        if not self.relayed_addrs:
            raise ValueError("an allocation has at least one relayed address")


@dataclass(frozen=True, slots=True)
class AllocationFailed(AllocationEvent):
    """The relay refused or never answered the Allocate request."""

    server: Addr
    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class AllocationLost(AllocationEvent):
    """A ready allocation is gone (relay restarted, unreachable, or refused a refresh)."""

    server: Addr
    relayed_addrs: tuple[Addr, ...]
    reason: str


@dataclass(slots=True)
class _Txn:
    txid: bytes
    kind: str  # "allocate" | "refresh" | "free" | "bind" | "channel" | "permission"
    msg: Message
    authenticated: bool
    started: float
    deadline: float
    peer: Addr | None = None
    stale_retried: bool = False


@dataclass(slots=True)
class _Channel:
    number: int
    peer: Addr
    bound: bool = False
    expires: float = 0.0
    rebind_at: float = 0.0
    pending: deque[bytes] = field(default_factory=deque)
    in_flight: bool = False


class Allocation:
    """One TURN allocation on one relay; see the module docstring."""

    def __init__(
        self,
        *,
        server: Addr,
        username: str,
        password: str,
        realm: str = "firezone",
        rng: Rng,
        now: float,
        software: str = "fz",
        local: Addr | None = None,
        lifetime: int = DEFAULT_LIFETIME,
        ipv6: bool = False,
    ) -> None:
        self.server = server
        self.local = local
        self._rng = rng
        self._software = software
        self._realm = realm
        self._lifetime_req = lifetime
        self._ipv6 = ipv6
        self._username = username
        self._password = password
        self._nonce: str | None = None
        self._key: bytes | None = None
        self.state = AllocationState.ALLOCATING
        self.relayed_addrs: tuple[Addr, ...] = ()
        self.srflx: Addr | None = None
        self.lifetime = 0
        self.expires_at: float | None = None
        self._refresh_at: float | None = None
        self._binding_at: float | None = None
        self._txns: dict[bytes, _Txn] = {}
        self._transmits: deque[Transmit] = deque()
        self._events: deque[AllocationEvent] = deque()
        self._peer_data: deque[tuple[Addr, bytes]] = deque()
        self._channels_by_peer: dict[Addr, _Channel] = {}
        self._channels_by_number: dict[int, _Channel] = {}
        self._next_channel = CHANNEL_FIRST
        self._refused: dict[Addr, float] = {}  # peer -> time a new ChannelBind may be tried
        self.stats: dict[str, int] = {}
        # The latest time we were given: poll_timeout returns it while output waits.
        self._now = now
        self._allocate(now)

    # --- helpers ------------------------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _new_msg(self, method: Method, cls: Class = Class.REQUEST) -> Message:
        return Message(method, cls, self._rng.token_bytes(12))

    def _send_request(self, kind: str, msg: Message, now: float, peer: Addr | None = None) -> _Txn:
        authenticated = self._key is not None and self._nonce is not None
        if authenticated:
            msg.add(Attr.USERNAME, self._username)
            msg.add(Attr.REALM, self._realm)
            msg.add(Attr.NONCE, self._nonce)
        if self._software and msg.method == Method.ALLOCATE:
            msg.add(Attr.SOFTWARE, self._software)
        txn = _Txn(msg.transaction_id, kind, msg, authenticated, now, now + REQUEST_RTO, peer)
        self._txns[txn.txid] = txn
        self._emit(txn)
        return txn

    def _emit(self, txn: _Txn) -> None:
        key = self._key if txn.authenticated else None
        self._transmits.append(Transmit(self.local, self.server, txn.msg.encode(key=key)))

    def _resend_with(self, txn: _Txn, now: float) -> None:
        """Send the same request again (new transaction id, current nonce and key)."""
        del self._txns[txn.txid]
        attrs = [
            (t, v)
            for t, v in txn.msg.attributes
            if t not in (Attr.USERNAME, Attr.REALM, Attr.NONCE, Attr.SOFTWARE)
        ]
        msg = self._new_msg(Method(txn.msg.method))
        msg.attributes.extend(attrs)
        new = self._send_request(txn.kind, msg, now, txn.peer)
        new.stale_retried = txn.stale_retried

    # --- requests -----------------------------------------------------------------------------
    def _allocate(self, now: float) -> None:
        self.state = AllocationState.ALLOCATING
        msg = self._new_msg(Method.ALLOCATE)
        msg.add(Attr.REQUESTED_TRANSPORT, TRANSPORT_UDP)
        if self._ipv6:
            msg.add(Attr.ADDITIONAL_ADDRESS_FAMILY, FAMILY_IPV6)
        msg.add(Attr.LIFETIME, self._lifetime_req)
        self._send_request("allocate", msg, now)

    def refresh(self, now: float, lifetime: int | None = None) -> None:
        """Send a Refresh now (lifetime 0 deletes the allocation)."""
        self._now = max(self._now, now)
        if self.state != AllocationState.READY:
            return
        msg = self._new_msg(Method.REFRESH)
        msg.add(Attr.LIFETIME, self._lifetime_req if lifetime is None else lifetime)
        self._send_request("free" if lifetime == 0 else "refresh", msg, now)

    def free(self, now: float) -> None:
        """Delete the allocation on the relay (Refresh with LIFETIME 0) and stop all timers."""
        self._now = max(self._now, now)
        if self.state == AllocationState.READY:
            self.refresh(now, 0)
        self._stop(AllocationState.FREED)
        # The deletion is sent once and never retried: nothing waits for its answer.
        self._txns.clear()

    def _stop(self, state: AllocationState) -> None:
        self.state = state
        self._txns = {k: t for k, t in self._txns.items() if t.kind == "free"}
        self._refresh_at = self._binding_at = None
        self.expires_at = None
        self._channels_by_peer.clear()
        self._channels_by_number.clear()
        self._next_channel = CHANNEL_FIRST
        self._refused.clear()

    def update_credentials(self, username: str, password: str, now: float) -> None:
        """New credentials from the portal: allocate again with them.

        The relay ties an allocation to the username that created it (441 for any other), so a
        ready allocation is deleted (AllocationLost) and a new one made (AllocationReady).
        """
        self._now = max(self._now, now)
        if (username, password) == (self._username, self._password) and self.state in (
            AllocationState.READY,
            AllocationState.ALLOCATING,
        ):
            return
        if self.state == AllocationState.FREED:
            return
        if self.state == AllocationState.READY:
            relayed = self.relayed_addrs
            self.refresh(now, 0)
            self._stop(AllocationState.LOST)
            self._events.append(AllocationLost(self.server, relayed, "credentials changed"))
        self._username, self._password = username, password
        self._key = (
            long_term_key(username, self._realm, password) if self._nonce is not None else None
        )
        self.relayed_addrs = ()
        self._txns = {k: t for k, t in self._txns.items() if t.kind == "free"}
        self._allocate(now)

    def bind_channel(self, peer: Addr, now: float) -> int | None:
        """Bind (or keep bound) a channel to ``peer``; returns its number, None when not possible."""
        self._now = max(self._now, now)
        if self.state != AllocationState.READY:
            return None
        ch = self._channels_by_peer.get(peer)
        if ch is None:
            until = self._refused.get(peer)
            if until is not None:
                if now < until:
                    self._count("channel_refused_skipped")
                    return None
                del self._refused[peer]
            number = self._free_channel_number()
            if number is None:
                self._count("channels_exhausted")
                return None
            ch = _Channel(number, peer)
            self._channels_by_peer[peer] = ch
            self._channels_by_number[number] = ch
        if not ch.in_flight:
            self._send_channel_bind(ch, now)
        return ch.number

    def _free_channel_number(self) -> int | None:
        for _ in range(CHANNEL_LAST - CHANNEL_FIRST + 1):
            n = self._next_channel
            self._next_channel = CHANNEL_FIRST if n == CHANNEL_LAST else n + 1
            if n not in self._channels_by_number:
                return n
        return None

    def _send_channel_bind(self, ch: _Channel, now: float) -> None:
        msg = self._new_msg(Method.CHANNEL_BIND)
        msg.add(Attr.CHANNEL_NUMBER, ch.number)
        msg.add(Attr.XOR_PEER_ADDRESS, ch.peer)
        ch.in_flight = True
        self._send_request("channel", msg, now, ch.peer)

    def create_permission(self, peer: Addr, now: float) -> None:
        """Install a permission for ``peer``'s IP (for Send/Data indications without a channel)."""
        self._now = max(self._now, now)
        if self.state != AllocationState.READY:
            return
        msg = self._new_msg(Method.CREATE_PERMISSION)
        msg.add(Attr.XOR_PEER_ADDRESS, peer)
        self._send_request("permission", msg, now, peer)

    def channel_for(self, peer: Addr) -> int | None:
        """The bound channel number towards ``peer``, if any."""
        ch = self._channels_by_peer.get(peer)
        return ch.number if ch is not None and ch.bound else None

    def encode_to_peer(self, peer: Addr, payload: bytes, now: float | None = None) -> bytes | None:
        """ChannelData for ``peer`` when its channel is bound.

        Otherwise returns None; with ``now`` the channel is bound on demand and the payload
        queued (sent through :meth:`poll_transmit` once the binding succeeds).
        """
        ch = self._channels_by_peer.get(peer)
        if ch is not None and ch.bound:
            return encode_channel_data(ch.number, payload)
        if now is None or self.state != AllocationState.READY:
            return None
        if ch is None:
            if self.bind_channel(peer, now) is None:
                return None
            ch = self._channels_by_peer[peer]
        if len(ch.pending) < MAX_PENDING_PER_PEER:
            ch.pending.append(bytes(payload))
        else:
            self._count("pending_dropped")
        return None

    # --- outputs ------------------------------------------------------------------------------
    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> AllocationEvent | None:
        return self._events.popleft() if self._events else None

    def poll_peer_data(self) -> tuple[Addr, bytes] | None:
        """The next ``(peer, payload)`` the relay forwarded to us."""
        return self._peer_data.popleft() if self._peer_data else None

    def poll_timeout(self) -> float | None:
        """The next instant :meth:`handle_timeout` has work to do (``now`` while output is queued)."""
        if self._transmits or self._events or self._peer_data:
            return self._now
        ds = [t.deadline for t in self._txns.values()]
        for d in (self._refresh_at, self._binding_at):
            if d is not None:
                ds.append(d)
        for ch in self._channels_by_peer.values():
            if ch.bound and not ch.in_flight:
                ds.append(ch.rebind_at)
        return min(ds) if ds else None

    # --- timers -------------------------------------------------------------------------------
    def handle_timeout(self, now: float) -> None:
        """Retransmit or abandon requests; refresh, keep alive and rebind channels when due."""
        self._now = max(self._now, now)
        for txn in [t for t in self._txns.values() if t.deadline <= now]:
            if txn.txid not in self._txns:
                continue
            if now - txn.started >= REQUEST_GIVE_UP or txn.kind == "free":
                del self._txns[txn.txid]
                self._txn_timed_out(txn, now)
            else:
                txn.deadline = now + REQUEST_RTO
                self._emit(txn)
        if self.state != AllocationState.READY:
            return
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self.refresh(now)
        if self._binding_at is not None and now >= self._binding_at:
            self._binding_at = now + BINDING_INTERVAL
            msg = self._new_msg(Method.BINDING)
            txn = _Txn(msg.transaction_id, "bind", msg, False, now, now + REQUEST_RTO)
            self._txns[txn.txid] = txn
            self._emit(txn)
        for ch in list(self._channels_by_peer.values()):
            if ch.bound and not ch.in_flight and now >= ch.rebind_at:
                self._send_channel_bind(ch, now)
            if ch.bound and now >= ch.expires:
                self._drop_channel(ch)

    def _txn_timed_out(self, txn: _Txn, now: float) -> None:
        log.debug("TURN request timed out", extra={"kind": txn.kind, "server": self.server})
        if txn.kind == "allocate":
            self._fail(None, "timeout")
        elif txn.kind in ("refresh", "bind"):
            self._lose("relay did not answer")
        elif txn.kind == "channel" and txn.peer is not None:
            ch = self._channels_by_peer.get(txn.peer)
            if ch is not None:
                ch.in_flight = False
                if not ch.bound:
                    self._drop_channel(ch)

    def _drop_channel(self, ch: _Channel) -> None:
        self._channels_by_peer.pop(ch.peer, None)
        self._channels_by_number.pop(ch.number, None)

    def _fail(self, code: int | None, reason: str) -> None:
        self._stop(AllocationState.FAILED)
        self._events.append(AllocationFailed(self.server, code, reason))
        log.debug("TURN allocation failed", extra={"code": code, "reason": reason})

    def _lose(self, reason: str) -> None:
        relayed = self.relayed_addrs
        self._stop(AllocationState.LOST)
        self.relayed_addrs = ()
        self._events.append(AllocationLost(self.server, relayed, reason))
        log.debug("TURN allocation lost", extra={"reason": reason})

    # --- input --------------------------------------------------------------------------------
    def decapsulate(self, data: bytes, src: Addr) -> tuple[Addr, memoryview] | None:
        """ChannelData fast path: ``(peer, payload)`` for a bound channel, else None."""
        if src != self.server or len(data) < 4 or not 0x40 <= data[0] <= 0x4F:
            return None
        ch = self._channels_by_number.get((data[0] << 8) | data[1])
        if ch is None or not ch.bound:
            return None
        length = (data[2] << 8) | data[3]
        if length > len(data) - 4 or len(data) - 4 - length > 3:
            return None
        return ch.peer, memoryview(data)[4 : 4 + length]

    def handle_input(self, data: bytes, src: Addr, now: float) -> bool:
        """Feed a datagram from ``src``; True when it came from this allocation's relay."""
        self._now = max(self._now, now)
        if src != self.server:
            return False
        if is_channel_data(data):
            got = self.decapsulate(data, src)
            if got is None:
                self._count("channel_data_dropped")
            else:
                self._peer_data.append((got[0], bytes(got[1])))
            return True
        if not is_stun(data):
            return False
        try:
            msg = parse_message(data)
        except ValueError:
            self._count("malformed")
            return True
        if msg.cls == Class.INDICATION:
            if msg.method == Method.DATA:
                peer, payload = msg.get(Attr.XOR_PEER_ADDRESS), msg.get(Attr.DATA)
                if peer is None or payload is None:
                    self._count("bad_data_indication")
                else:
                    self._peer_data.append((peer, payload))
            return True
        if msg.cls == Class.REQUEST:
            return False  # e.g. an ICE check relayed from elsewhere is not ours
        txn = self._txns.get(msg.transaction_id)
        if txn is None:
            self._count("unmatched_response")
            # Not ours: the same relay may serve another agent's checks on this socket.
            return False
        if txn.authenticated and self._key is not None and not verify_integrity(msg, self._key):
            # RFC 8489 §9.2.5: 401 and 438 may come unsigned (they carry the new nonce); anything
            # else unsigned on an authenticated transaction could be spoofed, so it is ignored.
            ec = msg.get(Attr.ERROR_CODE) if msg.cls == Class.ERROR else None
            if ec is None or ec.code not in (401, 438):
                self._count("bad_integrity")
                return True
        del self._txns[txn.txid]
        if msg.cls == Class.ERROR:
            self._on_error(txn, msg, now)
        else:
            self._on_success(txn, msg, now)
        return True

    def _on_error(self, txn: _Txn, msg: Message, now: float) -> None:
        ec: ErrorCode | None = msg.get(Attr.ERROR_CODE)
        code = ec.code if ec is not None else None
        reason = ec.reason if ec is not None else ""
        nonce = msg.get(Attr.NONCE)
        if code == 401 and not txn.authenticated and nonce is not None:
            # RFC 8489 §9.2.4: the challenge; compute the key and retry with credentials.
            self._realm = msg.get(Attr.REALM) or self._realm
            self._nonce = nonce
            self._key = long_term_key(self._username, self._realm, self._password)
            self._retry(txn, now)
            return
        if code == 438 and nonce is not None and not txn.stale_retried:
            self._nonce = nonce
            txn.stale_retried = True
            self._retry(txn, now)
            return
        if txn.kind == "allocate":
            if code == 437 and not txn.stale_retried:
                # A stale allocation on our 5-tuple (e.g. we restarted): delete it, then retry.
                txn.stale_retried = True
                msg0 = self._new_msg(Method.REFRESH)
                msg0.add(Attr.LIFETIME, 0)
                self._send_request("free", msg0, now)
                self._retry(txn, now)
                return
            self._fail(code, reason or "allocate refused")
        elif txn.kind in ("refresh", "bind"):
            self._lose(f"refresh refused ({code})" if txn.kind == "refresh" else "binding refused")
        elif txn.kind == "channel" and txn.peer is not None:
            ch = self._channels_by_peer.get(txn.peer)
            if ch is not None:
                ch.in_flight = False
                if code == 437:
                    self._lose("allocation mismatch")
                elif not ch.bound:
                    self._drop_channel(ch)
                    if code == 403:
                        self._refused[txn.peer] = now + CHANNEL_REFUSED_BACKOFF
        log.debug("TURN error response", extra={"kind": txn.kind, "code": code})

    def _retry(self, txn: _Txn, now: float) -> None:
        self._txns[txn.txid] = txn  # so _resend_with can remove it
        self._resend_with(txn, now)

    def _on_success(self, txn: _Txn, msg: Message, now: float) -> None:
        if txn.kind == "allocate":
            relayed = tuple(msg.get_all(Attr.XOR_RELAYED_ADDRESS))
            if not relayed:
                self._fail(None, "no relayed address in Allocate response")
                return
            self.relayed_addrs = relayed
            self.srflx = msg.get(Attr.XOR_MAPPED_ADDRESS)
            self._set_lifetime(msg.get(Attr.LIFETIME, DEFAULT_LIFETIME), now)
            self.state = AllocationState.READY
            self._binding_at = now + BINDING_INTERVAL
            self._events.append(AllocationReady(self.server, relayed, self.srflx, self.lifetime))
            log.debug("TURN allocation ready", extra={"server": self.server, "relayed": relayed})
        elif txn.kind == "refresh":
            self._set_lifetime(msg.get(Attr.LIFETIME, self._lifetime_req), now)
        elif txn.kind == "bind":
            mapped = msg.get(Attr.XOR_MAPPED_ADDRESS)
            if mapped is not None:
                self.srflx = mapped
        elif txn.kind == "channel" and txn.peer is not None:
            ch = self._channels_by_peer.get(txn.peer)
            if ch is None:
                return
            ch.in_flight = False
            ch.bound = True
            ch.expires = now + CHANNEL_LIFETIME
            ch.rebind_at = now + CHANNEL_REBIND_AFTER
            while ch.pending:
                self._transmits.append(
                    Transmit(
                        self.local,
                        self.server,
                        encode_channel_data(ch.number, ch.pending.popleft()),
                    )
                )
            if log.isEnabledFor(TRACE):
                log.log(TRACE, "TURN channel bound", extra={"channel": ch.number, "peer": ch.peer})

    def _set_lifetime(self, lifetime: int, now: float) -> None:
        self.lifetime = int(lifetime)
        self.expires_at = now + self.lifetime
        self._refresh_at = now + self.lifetime / 2 if self.lifetime > 0 else None
