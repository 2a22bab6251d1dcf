"""TURN server core (RFC 8656 over UDP), sans-IO: datagrams in, commands out.

Theory of operation
-------------------
The driver feeds every datagram that arrives on the listening port to
:meth:`TurnServer.handle_client_datagram` and every datagram that arrives on a relayed port to
:meth:`TurnServer.handle_peer_datagram`, then drains :meth:`TurnServer.poll_command` and performs
what it returns (:class:`SendToClient`, :class:`SendToPeer`, :class:`CreateAllocationPort`,
:class:`FreeAllocationPort`). It re-arms one timer at :meth:`poll_timeout` and calls
:meth:`handle_timeout` when it fires. ChannelData, the bulk of the traffic, first goes through
:meth:`relay_channel_data` / :meth:`relay_peer_data`: a dict lookup and a slice, no command
objects; ``None`` from them means "not fast-path, call ``handle_*``".

Per client 5-tuple (the client's ``(ip, port)`` on the listening socket) there is at most one
allocation::

    (none) --Allocate ok--> ALLOCATED --Refresh(0) / lifetime expiry / port unavailable--> (none)

An allocation owns one relayed port per address family (one port pool shared by both families,
so a relayed port number alone names its allocation), a set of permissions (peer IP -> expiry,
300 s, RFC 8656 §9) and channel bindings (number <-> peer transport address, 600 s, RFC 8656
§12). A channel binding is::

    ACTIVE --expiry--> COOLDOWN (300 s: number and peer stay reserved, no data) --> (removed)
    COOLDOWN --ChannelBind with the same number and peer--> ACTIVE

A channel is in the fast-path tables exactly while it is ACTIVE, its peer IP has an unexpired
permission and the allocation lives; every expiry is a timer, so the fast path needs no clock.

Authentication is the long-term credential mechanism (RFC 8489 §9.2) with Firezone's stateless
REST-style passwords (:mod:`firezone.proto.turn.credentials`). Nonces are stateless too: the
expiry and an HMAC over expiry and client IP, keyed by a random per-process key, so unauthenticated
requests cost the relay no memory. Binding requests need no authentication.

Bad input never raises: every datagram that is not acted on is counted in ``stats.drops`` under a
reason, and logged at DEBUG/TRACE.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import logging
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from firezone.logs import TRACE
from firezone.proto.rng import Rng
from firezone.proto.stun import (
    CHANNEL_MIN,
    FAMILY_IPV4,
    FAMILY_IPV6,
    AddressErrorCode,
    Attr,
    ChannelDataError,
    Class,
    Message,
    Method,
    ParseError,
    error_response,
    long_term_key,
    parse_channel_data,
    parse_message,
    success_response,
    verify_integrity,
)
from firezone.proto.stun.attributes import REASONS
from firezone.proto.turn.credentials import REALM, parse_username, password_for, secret_text

log = logging.getLogger(__name__)

# RFC 8656 §7.2 / Firezone: default and maximum allocation lifetime.
DEFAULT_LIFETIME = 600.0
MAX_LIFETIME = 3600.0
PERMISSION_LIFETIME = 300.0  # RFC 8656 §9
CHANNEL_LIFETIME = 600.0  # RFC 8656 §12
CHANNEL_COOLDOWN = 300.0  # RFC 8656 §12: number/peer not rebound to others for 5 min after expiry
RESERVATION_LIFETIME = 30.0  # RFC 8656 §7.2: an EVEN-PORT R-bit reservation lasts ~30 s
NONCE_LIFETIME = 600.0  # coturn's default stale-nonce interval
UDP_PROTOCOL = 17  # RFC 8656 §18.8: REQUESTED-TRANSPORT value for UDP
DEFAULT_MAX_ALLOCATIONS_PER_USERNAME = 10
# RFC 8656 §12 allows 0x4000-0x4FFF, but RFC 5766 allowed up to 0x7FFF and coturn's clients still
# pick from that range; the relay accepts both (its own client stays in 0x4000-0x4FFF).
ACCEPTED_CHANNEL_MAX = 0x7FFF

_CD_HDR = struct.Struct("!HH")
_CD_UNPACK = _CD_HDR.unpack_from


# -- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """Base of everything :meth:`TurnServer.poll_command` returns."""


@dataclass(frozen=True, slots=True)
class SendToClient(Command):
    """Send ``data`` from the listening port to ``client``."""

    data: bytes
    client: tuple[str, int]


@dataclass(frozen=True, slots=True)
class SendToPeer(Command):
    """Send ``data`` from relayed port ``relay_port`` (family 4 or 6) to ``peer``."""

    data: bytes
    peer: tuple[str, int]
    relay_port: int
    family: int


@dataclass(frozen=True, slots=True)
class CreateAllocationPort(Command):
    """Open a UDP socket on relayed ``port`` for family 4 or 6."""

    port: int
    family: int


@dataclass(frozen=True, slots=True)
class FreeAllocationPort(Command):
    """Close the UDP socket on relayed ``port`` for family 4 or 6."""

    port: int
    family: int


# -- counters ------------------------------------------------------------------------------------


@dataclass(slots=True)
class TurnStats:
    """Counters and gauges for the relay's /metrics."""

    allocations: int = 0  # gauge
    channels: int = 0  # gauge: ACTIVE channel bindings
    permissions: int = 0  # gauge
    allocations_created: int = 0
    allocations_expired: int = 0
    requests: int = 0
    binding_requests: int = 0
    challenges: int = 0  # 401 to requests without MESSAGE-INTEGRITY (normal first step)
    auth_failures: int = 0  # wrong password, expired or malformed username, wrong realm
    stale_nonces: int = 0
    packets_client_to_peer: int = 0
    bytes_client_to_peer: int = 0
    packets_peer_to_client: int = 0
    bytes_peer_to_client: int = 0
    errors_sent: dict[int, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# -- state ---------------------------------------------------------------------------------------


class _Channel:
    __slots__ = (
        "active",
        "alloc",
        "expires",
        "family",
        "number",
        "peer",
        "relay_port",
        "valid_until",
    )

    def __init__(self, alloc: _Allocation, number: int, peer: tuple[str, int], family: int) -> None:
        self.alloc = alloc
        self.number = number
        self.peer = peer
        self.family = family
        self.relay_port = alloc.relays[family]
        self.expires = 0.0
        self.active = False
        self.valid_until = 0.0  # min(channel, permission, allocation expiry) while in fast tables


class _Allocation:
    __slots__ = (
        "alloc_key",
        "alloc_response",
        "alloc_tid",
        "channels",
        "client",
        "expires",
        "peer_channels",
        "perms",
        "relays",
        "username",
    )

    def __init__(self, client: tuple[str, int], username: str) -> None:
        self.client = client
        self.username = username
        self.relays: dict[int, int] = {}  # family (4/6) -> relayed port
        self.expires = 0.0
        self.perms: dict[str, float] = {}  # peer IP -> expiry
        self.channels: dict[int, _Channel] = {}
        self.peer_channels: dict[tuple[str, int], _Channel] = {}
        self.alloc_tid = b""
        self.alloc_response = b""
        self.alloc_key = b""


def _family_of(ip_text: str) -> int:
    return 6 if ":" in ip_text else 4


class TurnServer:
    """The relay's STUN/TURN logic; see the module docstring."""

    def __init__(
        self,
        *,
        secret: bytes | str,
        realm: str = REALM,
        public_ip4: str | None,
        public_ip6: str | None,
        relay_ports: tuple[int, int] = (49152, 65535),
        rng: Rng,
        now: float,
        unix_time: float,
        allow_loopback_peers: bool = False,
        software: str = "fz-relay",
        max_allocations_per_username: int = DEFAULT_MAX_ALLOCATIONS_PER_USERNAME,
    ) -> None:
        lo, hi = relay_ports
        if not 1 <= lo <= hi <= 65535:
            raise ValueError("relay_ports must be a range within 1-65535")
        if public_ip4 is None and public_ip6 is None:
            raise ValueError("at least one of public_ip4 / public_ip6 is needed")
        self.realm = realm
        self.software = software
        self.allow_loopback_peers = allow_loopback_peers
        self.max_allocations_per_username = max_allocations_per_username
        self.stats = TurnStats()
        self._public = {4: public_ip4, 6: public_ip6}
        self._own_ips = {
            ipaddress.ip_address(ip) for ip in (public_ip4, public_ip6) if ip is not None
        }
        self._ports_lo, self._ports_hi = lo, hi
        self._rng = rng
        self._secret = secret_text(secret)
        self._previous_secret: str | None = None
        self._nonce_key = rng.token_bytes(32)
        self._now0 = now
        self._unix0 = unix_time
        self._now = now
        self._reply_sha256 = False
        self._commands: deque[Command] = deque()
        self._allocs: dict[tuple[str, int], _Allocation] = {}
        self._by_port: dict[int, _Allocation] = {}
        self._user_allocs: dict[str, int] = {}
        # Fast-path tables: only ACTIVE channels whose permission and allocation are alive.
        self._client_channels: dict[tuple[tuple[str, int], int], _Channel] = {}
        self._peer_channels: dict[tuple[int, tuple[str, int]], _Channel] = {}
        # RESERVATION-TOKEN -> (reserved port, family, expiry); reserved port -> token
        self._reservations: dict[bytes, tuple[int, int, float]] = {}
        self._reserved_ports: dict[int, bytes] = {}
        self._timers: list[tuple[float, int, str, _Allocation | None, Any]] = []
        self._timer_seq = 0

    # ------------------------------------------------------------------ public API

    def update_secret(self, secret: bytes | str) -> None:
        """Switch to a new relay secret; credentials minted with the previous one still work."""
        self._previous_secret = self._secret
        self._secret = secret_text(secret)

    def poll_command(self) -> Command | None:
        """Next side effect for the driver to perform, or ``None``."""
        return self._commands.popleft() if self._commands else None

    def poll_timeout(self) -> float | None:
        """When :meth:`handle_timeout` must run next (``now`` while commands are queued)."""
        if self._commands:
            return self._now
        return self._timers[0][0] if self._timers else None

    def handle_timeout(self, now: float) -> None:
        """Expire allocations, permissions and channels whose time has come."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, alloc, key = heapq.heappop(timers)
            if alloc is None:
                resv = self._reservations.get(key)
                if kind == "resv" and resv is not None and resv[2] <= now:
                    del self._reservations[key]
                    self._reserved_ports.pop(resv[0], None)
                continue
            if self._allocs.get(alloc.client) is not alloc:
                continue
            if kind == "alloc":
                if alloc.expires <= now:
                    log.debug("allocation expired", extra={"client": alloc.client})
                    self.stats.allocations_expired += 1
                    self._delete_allocation(alloc)
            elif kind == "perm":
                exp = alloc.perms.get(key)
                if exp is not None and exp <= now:
                    del alloc.perms[key]
                    self.stats.permissions -= 1
                    for bound in alloc.channels.values():
                        if bound.peer[0] == key:
                            self._sync_channel(bound, now)
            elif kind == "chan":
                ch = alloc.channels.get(key)
                if ch is not None and ch.active and ch.expires <= now:
                    ch.active = False
                    self.stats.channels -= 1
                    self._sync_channel(ch, now)
                    self._schedule(ch.expires + CHANNEL_COOLDOWN, "chan_free", alloc, key)
            elif kind == "chan_free":
                ch = alloc.channels.get(key)
                if ch is not None and not ch.active and ch.expires + CHANNEL_COOLDOWN <= now:
                    del alloc.channels[key]
                    del alloc.peer_channels[ch.peer]

    def port_unavailable(self, port: int, family: int, now: float) -> None:
        """The driver could not open relayed ``port``: drop its allocation, answer 508 if pending."""
        self._now = now
        alloc = self._by_port.get(port)
        if alloc is None:
            return
        log.warning("relayed port unavailable", extra={"port": port})
        if alloc.alloc_response:
            # Replace the not-yet-sent success response with 508.
            for i, cmd in enumerate(self._commands):
                if isinstance(cmd, SendToClient) and cmd.data == alloc.alloc_response:
                    req = Message(Method.ALLOCATE, Class.REQUEST, alloc.alloc_tid)
                    err = self._error(req, 508, key=alloc.alloc_key)
                    self._commands[i] = SendToClient(err, alloc.client)
                    break
        self._delete_allocation(alloc)

    def relay_channel_data(
        self, data: bytes, client: tuple[str, int], now: float | None = None
    ) -> tuple[bytes, tuple[str, int], int] | None:
        """Fast path client -> peer: ``(payload, peer, relay_port)``, or ``None`` for the slow path."""
        try:
            number, length = _CD_UNPACK(data)
        except struct.error:
            return None
        ch = self._client_channels.get((client, number))
        if ch is None:
            return None
        n = len(data) - 4
        if n != length and not length < n <= length + 3:  # RFC 8656 §12.5: up to 3 padding bytes
            return None
        if now is not None and ch.valid_until <= now:
            return None
        st = self.stats
        st.packets_client_to_peer += 1
        st.bytes_client_to_peer += length
        return data[4 : 4 + length], ch.peer, ch.relay_port

    def relay_peer_data(
        self, data: bytes, peer: tuple[str, int], relay_port: int, now: float | None = None
    ) -> tuple[bytes, tuple[str, int]] | None:
        """Fast path peer -> client: ``(channel_data_datagram, client)``, or ``None``."""
        ch = self._peer_channels.get((relay_port, peer))
        if ch is None:
            return None
        if now is not None and ch.valid_until <= now:
            return None
        n = len(data)
        if n > 0xFFFF:
            return None
        st = self.stats
        st.packets_peer_to_client += 1
        st.bytes_peer_to_client += n
        return _CD_HDR.pack(ch.number, n) + data, ch.alloc.client

    def handle_client_datagram(self, data: bytes, client: tuple[str, int], now: float) -> None:
        """A datagram on the listening port: STUN or ChannelData."""
        self._now = now
        try:
            if not data:
                self.stats.drop("empty")
                return
            first = data[0]
            if first < 0x40:
                self._on_stun(bytes(data), client, now)
            elif first < 0x80:
                self._on_client_channel_data(data, client, now)
            else:
                self.stats.drop("not_stun_or_channel_data")
        except Exception:  # never let one bad datagram stop the relay
            log.exception("TURN server failed on a client datagram")
            self.stats.drop("internal_error")

    def handle_peer_datagram(
        self, data: bytes, peer: tuple[str, int], relay_port: int, family: int, now: float
    ) -> None:
        """A datagram from ``peer`` on relayed port ``relay_port`` (``family`` is informational:
        relayed port numbers are unique across families)."""
        self._now = now
        try:
            self._on_peer_data(bytes(data), peer, relay_port, now)
        except Exception:
            log.exception("TURN server failed on a peer datagram")
            self.stats.drop("internal_error")

    def unix_now(self, now: float) -> float:
        """Wall-clock seconds corresponding to monotonic ``now``."""
        return self._unix0 + (now - self._now0)

    @property
    def allocation_count(self) -> int:
        return len(self._allocs)

    # ------------------------------------------------------------------ STUN dispatch

    def _on_stun(self, data: bytes, client: tuple[str, int], now: float) -> None:
        try:
            msg = parse_message(data)
        except ParseError as e:
            self.stats.drop("malformed_stun")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("malformed STUN dropped", extra={"client": client, "error": str(e)})
            return
        if msg.cls == Class.REQUEST:
            self.stats.requests += 1
            self._on_request(msg, client, now)
        elif msg.cls == Class.INDICATION:
            if msg.method == Method.SEND:
                self._on_send_indication(msg, client, now)
            elif msg.method == Method.BINDING:
                self.stats.drop("binding_indication")  # keepalive: nothing to do
            else:
                self.stats.drop("unexpected_indication")
        else:
            self.stats.drop("unexpected_response")

    def _on_request(self, msg: Message, client: tuple[str, int], now: float) -> None:
        self._reply_sha256 = False
        method = msg.method
        if method == Method.BINDING:
            self.stats.binding_requests += 1
            unknown = msg.unknown_comprehension_required()
            if unknown:
                self._send_error(
                    msg, client, 420, extra=[(Attr.UNKNOWN_ATTRIBUTES, tuple(unknown))]
                )
                return
            resp = success_response(msg, [(Attr.XOR_MAPPED_ADDRESS, client)])
            self._send(resp, client)
            return
        if method not in (
            Method.ALLOCATE,
            Method.REFRESH,
            Method.CREATE_PERMISSION,
            Method.CHANNEL_BIND,
        ):
            self._send_error(msg, client, 400)
            return
        # Answer in the integrity flavour the client used (RFC 8489 §9.2.4).
        self._reply_sha256 = msg.integrity_sha256
        auth = self._authenticate(msg, client, now)
        if auth is None:
            return
        username, key = auth
        unknown = msg.unknown_comprehension_required()
        if unknown:
            self._send_error(
                msg, client, 420, key=key, extra=[(Attr.UNKNOWN_ATTRIBUTES, tuple(unknown))]
            )
            return
        if method == Method.ALLOCATE:
            self._allocate(msg, client, username, key, now)
            return
        alloc = self._allocs.get(client)
        if alloc is None:
            self._send_error(msg, client, 437, key=key)
            return
        if alloc.username != username:
            self.stats.auth_failures += 1
            self._send_error(msg, client, 441, key=key)
            return
        if method == Method.REFRESH:
            self._refresh(msg, alloc, key, now)
        elif method == Method.CREATE_PERMISSION:
            self._create_permission(msg, alloc, key, now)
        else:
            self._channel_bind(msg, alloc, key, now)

    # ------------------------------------------------------------------ authentication

    def _nonce(self, client: tuple[str, int], now: float) -> str:
        expiry = format(int((now + NONCE_LIFETIME) * 1000), "x")
        mac = hmac.new(self._nonce_key, f"{expiry}:{client[0]}".encode(), hashlib.sha256)
        return f"{expiry}.{mac.hexdigest()[:24]}"

    def _nonce_valid(self, nonce: str, client: tuple[str, int], now: float) -> bool:
        expiry, sep, tag = nonce.partition(".")
        if not sep or len(tag) != 24:
            return False
        mac = hmac.new(self._nonce_key, f"{expiry}:{client[0]}".encode(), hashlib.sha256)
        if not hmac.compare_digest(mac.hexdigest()[:24], tag):
            return False
        try:
            return int(expiry, 16) / 1000 > now
        except ValueError:
            return False

    def _challenge(self, msg: Message, client: tuple[str, int], code: int, now: float) -> None:
        extra: list[tuple[int, Any]] = [
            (Attr.REALM, self.realm),
            (Attr.NONCE, self._nonce(client, now)),
        ]
        self._send_error(msg, client, code, extra=extra)

    def _authenticate(
        self, msg: Message, client: tuple[str, int], now: float
    ) -> tuple[str, bytes] | None:
        """RFC 8489 §9.2.4, in its order; returns ``(username, key)`` or answers and returns None."""
        if not msg.has_integrity:
            self.stats.challenges += 1
            self._challenge(msg, client, 401, now)
            return None
        username = msg.get(Attr.USERNAME)
        realm = msg.get(Attr.REALM)
        nonce = msg.get(Attr.NONCE)
        if username is None or realm is None or nonce is None:
            self.stats.auth_failures += 1
            self._send_error(msg, client, 400)
            return None
        if not self._nonce_valid(nonce, client, now):
            self.stats.stale_nonces += 1
            self._challenge(msg, client, 438, now)
            return None
        # An expired or malformed username is "not valid" (RFC 8489 §9.2.4) -> 401, which tells
        # the client to fetch new credentials; 441 is only for a request whose (valid)
        # credentials differ from the ones that created the allocation (RFC 8656 §6.2).
        reason = None
        if realm != self.realm:
            reason = "wrong_realm"
        else:
            try:
                expiry, _ = parse_username(username)
            except ValueError:
                reason = "malformed_username"
            else:
                if expiry < self.unix_now(now):
                    reason = "expired_username"
        if reason is None:
            for secret in (self._secret, self._previous_secret):
                if secret is None:
                    continue
                key = long_term_key(username, realm, password_for(secret, username))
                if verify_integrity(msg, key):
                    return username, key
            reason = "bad_integrity"
        self.stats.auth_failures += 1
        self.stats.drop(f"auth_{reason}")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("TURN authentication failed", extra={"client": client, "reason": reason})
        self._challenge(msg, client, 401, now)
        return None

    # ------------------------------------------------------------------ requests

    def _lifetime(self, requested: int | None) -> float:
        if requested is None:
            return DEFAULT_LIFETIME
        return float(min(max(requested, DEFAULT_LIFETIME), MAX_LIFETIME))

    def _allocate(
        self, msg: Message, client: tuple[str, int], username: str, key: bytes, now: float
    ) -> None:
        existing = self._allocs.get(client)
        if existing is not None:
            if existing.alloc_tid == msg.transaction_id and existing.alloc_response:
                # a retransmission: answer it again, identically
                self._commands.append(SendToClient(existing.alloc_response, client))
            else:
                self._send_error(msg, client, 437, key=key)
            return
        transport = msg.get(Attr.REQUESTED_TRANSPORT)
        if transport is None:
            self._send_error(msg, client, 400, key=key)
            return
        if transport != UDP_PROTOCOL:
            self._send_error(msg, client, 442, key=key)
            return
        requested = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        additional = msg.get(Attr.ADDITIONAL_ADDRESS_FAMILY)
        even_port = msg.get(Attr.EVEN_PORT)
        token = msg.get(Attr.RESERVATION_TOKEN)
        if token is not None and (
            even_port is not None or requested is not None or additional is not None
        ):
            self._send_error(msg, client, 400, key=key)  # RFC 8656 §7.2 steps 5 and 8
            return
        if requested is not None and additional is not None:
            self._send_error(msg, client, 400, key=key)  # RFC 8656 §7.2 step 8
            return
        if additional is not None and additional != FAMILY_IPV6:
            self._send_error(msg, client, 400, key=key)
            return
        if requested is None or requested == FAMILY_IPV4:
            primary = 4
        elif requested == FAMILY_IPV6:
            primary = 6
        else:
            self._send_error(msg, client, 440, key=key)
            return
        if self._public[primary] is None:
            self._send_error(msg, client, 440, key=key)
            return
        if self._user_allocs.get(username, 0) >= self.max_allocations_per_username:
            self._send_error(msg, client, 486, key=key)
            return
        new_token: bytes | None = None
        if token is not None:
            # RFC 8656 §7.2 step 5: take the port reserved by an earlier EVEN-PORT R=1 request.
            resv = self._reservations.pop(token, None)
            if resv is not None:
                self._reserved_ports.pop(resv[0], None)
            if resv is None or resv[2] <= now:
                self._send_error(msg, client, 508, key=key)
                return
            port, primary = resv[0], resv[1]
        else:
            # RFC 8656 §7.2 step 6: an even port; with the R bit, also reserve port + 1.
            picked = self._pick_port(even=even_port is not None, pair=even_port is True)
            if picked is None:
                self._send_error(msg, client, 508, key=key)
                return
            port = picked
            if even_port is True:
                new_token = self._rng.token_bytes(8)
                expiry = now + RESERVATION_LIFETIME
                self._reservations[new_token] = (port + 1, primary, expiry)
                self._reserved_ports[port + 1] = new_token
                self._schedule(expiry, "resv", None, new_token)
        alloc = _Allocation(client, username)
        alloc.relays[primary] = port
        address_error: AddressErrorCode | None = None
        if additional is not None:
            if self._public[6] is None:
                address_error = AddressErrorCode(FAMILY_IPV6, 440, REASONS[440])
            else:
                port6 = self._pick_port(reserve=port)
                if port6 is None:
                    address_error = AddressErrorCode(FAMILY_IPV6, 508, REASONS[508])
                else:
                    alloc.relays[6] = port6
        lifetime = self._lifetime(msg.get(Attr.LIFETIME))
        alloc.expires = now + lifetime
        self._allocs[client] = alloc
        for fam, p in alloc.relays.items():
            self._by_port[p] = alloc
            self._commands.append(CreateAllocationPort(p, fam))
        self._user_allocs[username] = self._user_allocs.get(username, 0) + 1
        self.stats.allocations += 1
        self.stats.allocations_created += 1
        self._schedule(alloc.expires, "alloc", alloc, None)
        attrs: list[tuple[int, Any]] = [
            (Attr.XOR_RELAYED_ADDRESS, (self._public[fam], p)) for fam, p in alloc.relays.items()
        ]
        attrs.append((Attr.LIFETIME, int(lifetime)))
        attrs.append((Attr.XOR_MAPPED_ADDRESS, client))
        if address_error is not None:
            attrs.append((Attr.ADDRESS_ERROR_CODE, address_error))
        if new_token is not None:
            attrs.append((Attr.RESERVATION_TOKEN, new_token))
        data = self._send(success_response(msg, attrs), client, key=key)
        alloc.alloc_tid = msg.transaction_id
        alloc.alloc_response = data
        alloc.alloc_key = key
        log.debug(
            "allocation created",
            extra={"client": client, "relays": dict(alloc.relays), "lifetime": lifetime},
        )

    def _refresh(self, msg: Message, alloc: _Allocation, key: bytes, now: float) -> None:
        family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if family is not None:
            fam = 4 if family == FAMILY_IPV4 else 6 if family == FAMILY_IPV6 else 0
            if fam not in alloc.relays:
                self._send_error(msg, alloc.client, 443, key=key)
                return
        requested = msg.get(Attr.LIFETIME)
        if requested == 0:
            self._delete_allocation(alloc)
            self._send(success_response(msg, [(Attr.LIFETIME, 0)]), alloc.client, key=key)
            log.debug("allocation deleted by refresh", extra={"client": alloc.client})
            return
        lifetime = self._lifetime(requested)
        alloc.expires = now + lifetime
        self._schedule(alloc.expires, "alloc", alloc, None)
        self._sync_allocation(alloc, now)
        self._send(success_response(msg, [(Attr.LIFETIME, int(lifetime))]), alloc.client, key=key)

    def _check_peer(
        self, msg: Message, alloc: _Allocation, peer: tuple[str, int], key: bytes
    ) -> bool:
        if _family_of(peer[0]) not in alloc.relays:
            self._send_error(msg, alloc.client, 443, key=key)
            return False
        if self._peer_forbidden(peer[0]):
            self.stats.drop("forbidden_peer")
            self._send_error(msg, alloc.client, 403, key=key)
            return False
        return True

    def _create_permission(self, msg: Message, alloc: _Allocation, key: bytes, now: float) -> None:
        peers = msg.get_all(Attr.XOR_PEER_ADDRESS)
        if not peers:
            self._send_error(msg, alloc.client, 400, key=key)
            return
        for peer in peers:  # all or nothing (RFC 8656 §9.2)
            if not self._check_peer(msg, alloc, peer, key):
                return
        for peer in peers:
            self._install_permission(alloc, peer[0], now)
        self._send(success_response(msg), alloc.client, key=key)

    def _channel_bind(self, msg: Message, alloc: _Allocation, key: bytes, now: float) -> None:
        number = msg.get(Attr.CHANNEL_NUMBER)
        peer = msg.get(Attr.XOR_PEER_ADDRESS)
        if number is None or peer is None or not CHANNEL_MIN <= number <= ACCEPTED_CHANNEL_MAX:
            self._send_error(msg, alloc.client, 400, key=key)
            return
        if not self._check_peer(msg, alloc, peer, key):
            return
        ch = alloc.channels.get(number)
        other = alloc.peer_channels.get(peer)
        if (ch is not None and ch.peer != peer) or (other is not None and other.number != number):
            # RFC 8656 §11.2: a number and a peer are bound to each other only (also in cooldown).
            self._send_error(msg, alloc.client, 400, key=key)
            return
        if ch is None:
            ch = _Channel(alloc, number, peer, _family_of(peer[0]))
            alloc.channels[number] = ch
            alloc.peer_channels[peer] = ch
        if not ch.active:
            ch.active = True
            self.stats.channels += 1
        ch.expires = now + CHANNEL_LIFETIME
        self._schedule(ch.expires, "chan", alloc, number)
        self._install_permission(alloc, peer[0], now)  # also syncs this channel
        self._send(success_response(msg), alloc.client, key=key)

    # ------------------------------------------------------------------ data

    def _on_send_indication(self, msg: Message, client: tuple[str, int], now: float) -> None:
        alloc = self._allocs.get(client)
        if alloc is None:
            self.stats.drop("send_without_allocation")
            return
        if msg.unknown_comprehension_required():
            self.stats.drop("send_unknown_attribute")
            return
        peer = msg.get(Attr.XOR_PEER_ADDRESS)
        payload = msg.get(Attr.DATA)
        if peer is None or payload is None:
            self.stats.drop("send_incomplete")
            return
        fam = _family_of(peer[0])
        port = alloc.relays.get(fam)
        if port is None:
            self.stats.drop("send_family_mismatch")
            return
        exp = alloc.perms.get(peer[0])
        if exp is None or exp <= now:
            self.stats.drop("no_permission")
            return
        self.stats.packets_client_to_peer += 1
        self.stats.bytes_client_to_peer += len(payload)
        self._commands.append(SendToPeer(payload, peer, port, fam))

    def _on_client_channel_data(self, data: bytes, client: tuple[str, int], now: float) -> None:
        try:
            number, payload = parse_channel_data(data)
        except ChannelDataError as e:
            self.stats.drop("malformed_channel_data")
            if log.isEnabledFor(TRACE):
                log.log(TRACE, "malformed ChannelData", extra={"client": client, "error": str(e)})
            return
        alloc = self._allocs.get(client)
        if alloc is None:
            self.stats.drop("channel_data_without_allocation")
            return
        ch = alloc.channels.get(number)
        if ch is None:
            self.stats.drop("unbound_channel")
            return
        if not ch.active or ch.valid_until <= now:
            self.stats.drop("channel_expired" if not ch.active else "no_permission")
            return
        self.stats.packets_client_to_peer += 1
        self.stats.bytes_client_to_peer += len(payload)
        self._commands.append(SendToPeer(bytes(payload), ch.peer, ch.relay_port, ch.family))

    def _on_peer_data(
        self, data: bytes, peer: tuple[str, int], relay_port: int, now: float
    ) -> None:
        alloc = self._by_port.get(relay_port)
        if alloc is None:
            self.stats.drop("peer_data_without_allocation")
            return
        exp = alloc.perms.get(peer[0])
        if exp is None or exp <= now:
            self.stats.drop("peer_without_permission")
            if log.isEnabledFor(TRACE):
                log.log(TRACE, "peer datagram without permission", extra={"peer": peer})
            return
        n = len(data)
        ch = alloc.peer_channels.get(peer)
        if ch is not None and ch.active and ch.valid_until > now:
            if n > 0xFFFF:
                self.stats.drop("peer_data_too_long")
                return
            out = _CD_HDR.pack(ch.number, n) + data
        else:
            ind = Message(Method.DATA, Class.INDICATION, self._rng.token_bytes(12))
            ind.add(Attr.XOR_PEER_ADDRESS, peer).add(Attr.DATA, data)
            out = ind.encode(fingerprint=False)
        self.stats.packets_peer_to_client += 1
        self.stats.bytes_peer_to_client += n
        self._commands.append(SendToClient(out, alloc.client))

    # ------------------------------------------------------------------ helpers

    def _peer_forbidden(self, ip_text: str) -> bool:
        """RFC 8656 §21.2: keep the relay from reaching itself or the network behind it."""
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip_text)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified or ip.is_link_local or ip.is_multicast:
            return True
        if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
            return True
        if self.allow_loopback_peers:
            return False
        return ip.is_loopback or ip in self._own_ips

    def _pick_port(
        self, reserve: int | None = None, *, even: bool = False, pair: bool = False
    ) -> int | None:
        """A free relayed port (even if asked; with ``pair``, port + 1 must be free too)."""
        lo, hi = self._ports_lo, self._ports_hi
        step = 2 if even else 1
        first = lo + (lo & 1) if even else lo
        last = hi - 1 if pair else hi
        if first > last:
            return None
        span = (last - first) // step + 1

        def free(p: int) -> bool:
            if p in self._by_port or p in self._reserved_ports or p == reserve:
                return False
            return not pair or (p + 1 not in self._by_port and p + 1 not in self._reserved_ports)

        for _ in range(8):
            p = first + step * self._rng.randbelow(span)
            if free(p):
                return p
        start = self._rng.randbelow(span)
        for i in range(span):
            p = first + step * ((start + i) % span)
            if free(p):
                return p
        return None

    def _install_permission(self, alloc: _Allocation, ip: str, now: float) -> None:
        if ip not in alloc.perms:
            self.stats.permissions += 1
        alloc.perms[ip] = now + PERMISSION_LIFETIME
        self._schedule(now + PERMISSION_LIFETIME, "perm", alloc, ip)
        for ch in alloc.channels.values():
            if ch.peer[0] == ip:
                self._sync_channel(ch, now)

    def _sync_allocation(self, alloc: _Allocation, now: float) -> None:
        for ch in alloc.channels.values():
            self._sync_channel(ch, now)

    def _sync_channel(self, ch: _Channel, now: float) -> None:
        """Put the channel in the fast-path tables iff it may carry data now."""
        alloc = ch.alloc
        perm = alloc.perms.get(ch.peer[0])
        ckey = (alloc.client, ch.number)
        pkey = (ch.relay_port, ch.peer)
        if ch.active and perm is not None:
            ch.valid_until = min(ch.expires, perm, alloc.expires)
        else:
            ch.valid_until = 0.0
        if ch.valid_until > now:
            self._client_channels[ckey] = ch
            self._peer_channels[pkey] = ch
        else:
            self._client_channels.pop(ckey, None)
            self._peer_channels.pop(pkey, None)

    def _delete_allocation(self, alloc: _Allocation) -> None:
        if self._allocs.get(alloc.client) is not alloc:
            return
        del self._allocs[alloc.client]
        for ch in alloc.channels.values():
            self._client_channels.pop((alloc.client, ch.number), None)
            self._peer_channels.pop((ch.relay_port, ch.peer), None)
            if ch.active:
                self.stats.channels -= 1
        self.stats.permissions -= len(alloc.perms)
        for fam, port in alloc.relays.items():
            self._by_port.pop(port, None)
            self._commands.append(FreeAllocationPort(port, fam))
        left = self._user_allocs.get(alloc.username, 1) - 1
        if left > 0:
            self._user_allocs[alloc.username] = left
        else:
            self._user_allocs.pop(alloc.username, None)
        self.stats.allocations -= 1

    def _schedule(self, deadline: float, kind: str, alloc: _Allocation | None, key: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, kind, alloc, key))

    def _send(
        self,
        msg: Message,
        client: tuple[str, int],
        *,
        key: bytes | None = None,
    ) -> bytes:
        if self.software:
            msg.add(Attr.SOFTWARE, self.software)
        data = msg.encode(key=key, sha256=self._reply_sha256)
        self._commands.append(SendToClient(data, client))
        return data

    def _error(
        self,
        msg: Message,
        code: int,
        *,
        key: bytes | None = None,
        extra: list[tuple[int, Any]] | None = None,
    ) -> bytes:
        err = error_response(msg, code, attributes=extra or ())
        if self.software:
            err.add(Attr.SOFTWARE, self.software)
        self.stats.errors_sent[code] = self.stats.errors_sent.get(code, 0) + 1
        return err.encode(key=key, sha256=self._reply_sha256)

    def _send_error(
        self,
        msg: Message,
        client: tuple[str, int],
        code: int,
        *,
        key: bytes | None = None,
        extra: list[tuple[int, Any]] | None = None,
    ) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "TURN error response",
                extra={"client": client, "method": int(msg.method), "code": code},
            )
        self._commands.append(SendToClient(self._error(msg, code, key=key, extra=extra), client))
