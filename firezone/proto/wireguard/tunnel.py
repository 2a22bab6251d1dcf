"""One WireGuard peer as a sans-IO state machine (whitepaper §5–§6).

Theory of operation
-------------------
A :class:`Tunnel` holds up to three sessions (transport key sets) and at most one handshake it
initiated:

    current   the session used to send; receiving also works with it
    previous  the session before ``current``, kept so packets already in flight still decrypt
    next      (responder only) a session we answered but that is not confirmed yet; the first
              transport packet that decrypts with it promotes it to ``current``
    pending   our handshake initiation awaiting its response

Transitions:

    encapsulate() with no usable current -> queue packet (bounded), send initiation, pending set
    response decrypts for pending        -> current = new (initiator), flush queue or keepalive,
                                            HandshakeCompleted(initiated_by_us=True)
    initiation from the peer             -> send response, next = new (responder)
    transport packet with next's index   -> previous = current, current = next, flush queue,
                                            HandshakeCompleted(initiated_by_us=False)
    pending for REKEY_TIMEOUT (+jitter)  -> new initiation; after rekey_attempt_time of trying:
                                            give up, drop the queue, ConnectionExpired
    current older than REJECT_AFTER_TIME -> sessions dropped, ConnectionExpired (unless a
                                            handshake is in flight; then its outcome decides)

Timers (whitepaper §6): rekey after REKEY_AFTER_TIME on send (initiator only) or after
REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT on receive; a keepalive KEEPALIVE_TIMEOUT
after receiving data when nothing was sent; a new handshake KEEPALIVE_TIMEOUT + REKEY_TIMEOUT after
sending data when nothing came back; optional persistent keepalive. Each timer is one float
deadline; the data path only stores floats and compares one.

Inputs come in with ``now`` (monotonic seconds); wall-clock time for TAI64N is ``unix_time`` at
construction plus elapsed ``now``. Bad datagrams are dropped and counted in ``drops``.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass

from firezone.logs import TRACE
from firezone.proto.rng import Rng

from . import handshake as hs
from .cookie import CookieJar, RateLimiter, verify_mac1
from .crypto import InvalidTag
from .keys import clamp
from .messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_LEN,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_LEN,
)
from .session import NONCE, REPLAY_BLOCK_MASK, REPLAY_WINDOW, Session
from .timers import (
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_PACKETS,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    jitter,
)

__all__ = [
    "ConnectionExpired",
    "HandshakeCompleted",
    "Tunnel",
    "TunnelEvent",
    "parse_initiation_sender",
]

log = logging.getLogger(__name__)

_PADS = tuple(bytes(i) for i in range(16))
_unpack_header = TRANSPORT_HEADER.unpack_from
_pack_header = TRANSPORT_HEADER.pack
_pack_nonce = NONCE.pack


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    """Base class of what a Tunnel reports through poll_event()."""

    now: float


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(TunnelEvent):
    """A new session is in use; ``initiated_by_us`` tells which side started the handshake."""

    initiated_by_us: bool


@dataclass(frozen=True, slots=True)
class ConnectionExpired(TunnelEvent):
    """The tunnel has no usable keys: handshakes gave up or the keys hit REJECT_AFTER_TIME."""

    reason: str = "expired"

    def __post_init__(self) -> None:
        if self.reason not in ("handshake_timeout", "keys_rejected", "expired"):
            raise ValueError(f"unknown ConnectionExpired reason {self.reason!r}")


def parse_initiation_sender(static_private: bytes, datagram: bytes | memoryview) -> bytes | None:
    """Return the initiator's static public key from a handshake initiation sent to us, else None."""
    data = bytes(datagram)
    if len(data) != INITIATION_LEN or data[:4] != b"\x01\x00\x00\x00":
        return None
    try:
        local = hs.LocalIdentity(static_private)
    except ValueError:
        return None
    if not verify_mac1(local.mac1_key, data):
        return None
    consumed = hs.decrypt_initiation_static(local, data)
    return None if consumed is None else consumed.initiator_static


class Tunnel:
    """One WireGuard peer: handshakes, transport keys, timers; bytes in, bytes out."""

    def __init__(
        self,
        *,
        static_private: bytes,
        peer_public: bytes,
        preshared_key: bytes | None,
        index: int,
        rng: Rng,
        now: float,
        unix_time: float,
        persistent_keepalive: float | None = None,
        rekey_attempt_time: float = REKEY_ATTEMPT_TIME,
        rate_limiter: RateLimiter | None = None,
        identity: hs.LocalIdentity | None = None,
    ) -> None:
        if not 0 <= index < 1 << 24:
            raise ValueError("index must be a 24-bit value")
        if persistent_keepalive is not None and persistent_keepalive <= 0:
            persistent_keepalive = None
        if identity is None or identity.private != static_private:
            identity = hs.LocalIdentity(static_private)
        self._local = identity
        self._peer = hs.PeerKeys(identity, peer_public, preshared_key)
        self.peer_public = peer_public
        self.index = index
        self._rng = rng
        self._unix_offset = unix_time - now
        self.persistent_keepalive = persistent_keepalive
        self.rekey_attempt_time = rekey_attempt_time
        self._rate_limiter = rate_limiter
        self._cookies = CookieJar()

        self._session_seq = 0
        self._current: Session | None = None
        self._previous: Session | None = None
        self._next: Session | None = None
        self._pending: hs.InitiatorState | None = None

        self._queue: deque[bytes] = deque()
        self._tx: deque[bytes] = deque()
        self._events: deque[TunnelEvent] = deque()
        self._out_at = now

        # Timer deadlines (None = not armed).
        self._retransmit_at: float | None = None
        self._attempt_started = 0.0
        self._last_initiation_sent: float | None = None
        self._keepalive_at: float | None = None
        self._new_handshake_at: float | None = None
        self._persistent_at: float | None = None
        self._sent_last_minute_handshake = False
        self._expired_reported = False
        self._new_handshake_delay = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter(rng)

        # Replay protection for initiations (whitepaper §5.1).
        self._last_timestamp_rx = b""
        self._last_initiation_rx: float | None = None
        self._last_timestamp_tx = b""

        self.last_handshake_unix: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.drops: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"Tunnel(index={self.index:#x}, established={self.is_established})"

    # ------------------------------------------------------------------ facts

    @property
    def is_established(self) -> bool:
        return self._current is not None

    @property
    def queued_packets(self) -> int:
        return len(self._queue)

    def _unix(self, now: float) -> float:
        return self._unix_offset + now

    # --------------------------------------------------------------- data path

    def encapsulate(self, packet: bytes | memoryview, now: float) -> bytes | None:
        """Encrypt an IP packet for the peer; None if it was queued (handshake) or dropped."""
        s = self._current
        if s is None or now >= s.reject_at or s.send_counter >= REJECT_AFTER_MESSAGES:
            self._enqueue(bytes(packet), now)
            return None
        counter = s.send_counter
        s.send_counter = counter + 1
        n = len(packet)
        # Whitepaper §5.4.6: pad the plaintext to a multiple of 16 bytes.
        pad = -n & 15
        plain: bytes | memoryview
        if pad:
            plain = bytes(packet) + _PADS[pad]
        else:
            plain = packet
        out = _pack_header(MSG_TRANSPORT, s.remote_index, counter) + s.send_aead.encrypt(
            _pack_nonce(counter), plain, None
        )
        self.tx_bytes += len(out)
        self._keepalive_at = None
        if self._new_handshake_at is None and n:
            self._new_handshake_at = now + self._new_handshake_delay
        if self.persistent_keepalive is not None:
            self._persistent_at = now + self.persistent_keepalive
        if now >= s.rekey_at or counter >= REKEY_AFTER_MESSAGES:
            self._initiate(now, retry=False)
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "wg encapsulate", extra={"len": n, "counter": counter})
        return out

    def decapsulate(
        self,
        datagram: bytes | memoryview,
        now: float,
        src: tuple[str, int] | None = None,
    ) -> bytes | None:
        """Process a datagram from the peer; returns a decrypted IP packet for the TUN or None."""
        n = len(datagram)
        if n < TRANSPORT_MIN_LEN or datagram[0] != MSG_TRANSPORT:
            self._handle_control(bytes(datagram), now, src, verified=False)
            return None
        mtype, idx, counter = _unpack_header(datagram)
        if mtype != MSG_TRANSPORT:
            self._handle_control(bytes(datagram), now, src, verified=False)
            return None
        s = self._current
        if s is None or s.local_index != idx:
            s = self._session_for(idx)
            if s is None:
                self.drops["index"] += 1
                return None
        if now >= s.reject_at:
            self.drops["expired"] += 1
            return None
        # Replay check before decrypting (cheap), window update after (authenticated only).
        mx = s.rx_max
        if counter <= mx:
            if (
                mx - counter >= REPLAY_WINDOW
                or (s.rx_words[(counter >> 6) & REPLAY_BLOCK_MASK] >> (counter & 63)) & 1
            ):
                self.drops["replay"] += 1
                return None
        elif counter >= REJECT_AFTER_MESSAGES:
            self.drops["counter"] += 1
            return None
        try:
            plain = s.recv_aead.decrypt(_pack_nonce(counter), datagram[16:], None)
        except InvalidTag:
            self.drops["decrypt"] += 1
            return None
        if counter > mx and (counter >> 6) == (mx >> 6):
            s.rx_max = counter
            s.rx_words[(counter >> 6) & REPLAY_BLOCK_MASK] |= 1 << (counter & 63)
        else:
            s.replay_mark(counter)
        self.rx_bytes += n
        self.rx_packets += 1
        self._new_handshake_at = None
        if self.persistent_keepalive is not None:
            self._persistent_at = now + self.persistent_keepalive
        if s is not self._current:
            if s is self._next:
                self._confirm_next(now)
        elif now >= s.rekey_on_rx_at and not self._sent_last_minute_handshake:
            self._sent_last_minute_handshake = True
            self._initiate(now, retry=False)
        pl = len(plain)
        if not pl:
            if log.isEnabledFor(TRACE):
                log.log(TRACE, "wg keepalive received", extra={"counter": counter})
            return None
        if self._keepalive_at is None:
            self._keepalive_at = now + KEEPALIVE_TIMEOUT
        # The plaintext is padded; the IP header says how much of it is the packet.
        v = plain[0] >> 4
        if v == 4 and pl >= 20:
            length = (plain[2] << 8) | plain[3]
            if length < 20:
                self.drops["malformed"] += 1
                return None
        elif v == 6 and pl >= 40:
            length = 40 + ((plain[4] << 8) | plain[5])
        else:
            self.drops["malformed"] += 1
            return None
        if length > pl:
            self.drops["malformed"] += 1
            return None
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "wg decapsulate", extra={"len": length, "counter": counter})
        return plain if length == pl else plain[:length]

    def _session_for(self, idx: int) -> Session | None:
        for s in (self._current, self._next, self._previous):
            if s is not None and s.local_index == idx:
                return s
        return None

    # ------------------------------------------------------------ control path

    def _handle_control(
        self, data: bytes, now: float, src: tuple[str, int] | None, *, verified: bool
    ) -> None:
        n = len(data)
        if n < 4 or data[1:4] != b"\x00\x00\x00":
            self.drops["malformed"] += 1
            return
        mtype = data[0]
        if mtype == MSG_INITIATION and n == INITIATION_LEN:
            if not verified and not self._admit(data, self._local.mac1_key, src, now):
                return
            consumed = hs.decrypt_initiation_static(self._local, data)
            if consumed is None:
                self.drops["decrypt"] += 1
                return
            self.handle_consumed_initiation(data, consumed, now)
        elif mtype == MSG_RESPONSE and n == RESPONSE_LEN:
            if not verified and not self._admit(data, self._local.mac1_key, src, now):
                return
            self._handle_response(data, now)
        elif mtype == MSG_COOKIE_REPLY and n == COOKIE_REPLY_LEN:
            self._handle_cookie_reply(data, now)
        else:
            self.drops["malformed"] += 1
        return

    def _admit(self, data: bytes, mac1_key: bytes, src: tuple[str, int] | None, now: float) -> bool:
        if not verify_mac1(mac1_key, data):
            self.drops["mac1"] += 1
            return False
        if self._rate_limiter is not None:
            reply = self._rate_limiter.check(data, src, now)
            if reply is not None:
                if reply:
                    self.drops["cookie"] += 1
                    self._push_tx(reply, now)
                else:
                    self.drops["rate_limited"] += 1
                return False
        return True

    def handle_consumed_initiation(
        self, data: bytes, consumed: hs.ConsumedInitiation, now: float
    ) -> bool:
        """Answer an initiation whose mac1 verified and whose static key decrypted.

        Used directly by :class:`~.device.Device`, which must decrypt the static key first to
        find the peer; returns True if a response was sent.
        """
        if consumed.initiator_static != self.peer_public:
            self.drops["peer"] += 1
            return False
        if not hs.finish_initiation(self._peer, data, consumed):
            self.drops["decrypt"] += 1
            return False
        # Whitepaper §5.1: a replayed initiation carries a timestamp we have already seen.
        if consumed.timestamp <= self._last_timestamp_rx:
            self.drops["timestamp"] += 1
            return False
        if (
            self._last_initiation_rx is not None
            and now - self._last_initiation_rx < HANDSHAKE_INITIATION_RATE
        ):
            self.drops["rate_limited"] += 1
            return False
        self._last_timestamp_rx = consumed.timestamp
        self._last_initiation_rx = now
        local_index = self._new_local_index()
        msg, send_key, recv_key = hs.create_response(
            self._peer, consumed, local_index, self._ephemeral()
        )
        self._next = Session(
            local_index=local_index,
            remote_index=consumed.sender_index,
            send_key=send_key,
            recv_key=recv_key,
            is_initiator=False,
            now=now,
        )
        self.rx_packets += 1
        self._new_handshake_at = None
        log.debug("wg handshake initiation received, sending response")
        self._push_tx(self._cookies.add_macs(self._peer.mac1_key, msg, now), now)
        self._authenticated_sent(now)
        return True

    def handle_verified_handshake(self, data: bytes, now: float) -> None:
        """Process a handshake response or cookie reply whose mac1 and load check already passed."""
        self._handle_control(data, now, None, verified=True)

    def _handle_response(self, data: bytes, now: float) -> None:
        pending = self._pending
        receiver = int.from_bytes(data[8:12], "little")
        if pending is None or receiver != pending.sender_index:
            self.drops["index"] += 1
            return
        keys = hs.consume_response(self._local, self._peer, pending, data)
        if keys is None:
            self.drops["decrypt"] += 1
            return
        send_key, recv_key = keys
        session = Session(
            local_index=pending.sender_index,
            remote_index=int.from_bytes(data[4:8], "little"),
            send_key=send_key,
            recv_key=recv_key,
            is_initiator=True,
            now=now,
        )
        self._pending = None
        self._retransmit_at = None
        if self._next is not None:
            self._previous = self._next
            self._next = None
        else:
            self._previous = self._current
        self._current = session
        self.rx_packets += 1
        self._new_handshake_at = None
        self._handshake_complete(now, initiated_by_us=True)
        # The initiator must send first so the responder can confirm the session.
        if not self._flush_queue(now):
            self._send_keepalive(now)

    def _handle_cookie_reply(self, data: bytes, now: float) -> None:
        receiver = int.from_bytes(data[4:8], "little")
        pending = self._pending
        expected = pending is not None and receiver == pending.sender_index
        if not expected and self._next is not None and receiver == self._next.local_index:
            expected = True
        if not expected:
            self.drops["index"] += 1
            return
        if not self._cookies.consume_reply(self._peer.cookie_key, data, now):
            self.drops["cookie"] += 1
            return
        log.debug("wg cookie reply accepted; next handshake carries mac2")

    def _confirm_next(self, now: float) -> None:
        self._previous = self._current
        self._current = self._next
        self._next = None
        self._handshake_complete(now, initiated_by_us=False)
        self._flush_queue(now)

    def _handshake_complete(self, now: float, *, initiated_by_us: bool) -> None:
        self._sent_last_minute_handshake = False
        self._expired_reported = False
        self.last_handshake_unix = self._unix(now)
        self._new_handshake_delay = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter(self._rng)
        self._events.append(HandshakeCompleted(now, initiated_by_us))
        log.debug("wg handshake completed", extra={"initiated_by_us": initiated_by_us})

    # ------------------------------------------------------------- handshakes

    def _new_local_index(self) -> int:
        self._session_seq = (self._session_seq + 1) & 0xFF
        return (self.index << 8) | self._session_seq

    def _ephemeral(self) -> bytes:
        return clamp(self._rng.token_bytes(32))

    def _timestamp(self, now: float) -> bytes:
        ts = hs.tai64n(self._unix(now))
        if ts <= self._last_timestamp_tx:
            # Two initiations inside one whitened clock step: keep them strictly increasing.
            ts = (int.from_bytes(self._last_timestamp_tx, "big") + 1).to_bytes(12, "big")
        self._last_timestamp_tx = ts
        return ts

    def _initiate(self, now: float, *, retry: bool) -> None:
        if not retry:
            if (
                self._last_initiation_sent is not None
                and now - self._last_initiation_sent < REKEY_TIMEOUT
            ):
                return
            if self._pending is None:
                self._attempt_started = now
                self._expired_reported = False
        self._send_initiation(now)

    def _send_initiation(self, now: float) -> None:
        state, msg = hs.create_initiation(
            self._local,
            self._peer,
            self._new_local_index(),
            self._ephemeral(),
            self._timestamp(now),
        )
        self._pending = state
        self._last_initiation_sent = now
        self._retransmit_at = now + REKEY_TIMEOUT + jitter(self._rng)
        log.debug("wg sending handshake initiation")
        self._push_tx(self._cookies.add_macs(self._peer.mac1_key, msg, now), now)
        self._authenticated_sent(now)

    def set_persistent_keepalive(self, interval: float | None, now: float) -> None:
        """Change the persistent keepalive interval (None or 0 turns it off)."""
        self.persistent_keepalive = interval if interval else None
        self._persistent_at = None if interval is None or not interval else now + interval

    def force_handshake(self, now: float) -> None:
        """Send a fresh handshake initiation now, restarting the rekey-attempt clock."""
        self._attempt_started = now
        self._send_initiation(now)

    # -------------------------------------------------------------- sending

    def _push_tx(self, datagram: bytes, now: float) -> None:
        self._tx.append(datagram)
        self._out_at = now

    def _authenticated_sent(self, now: float) -> None:
        self._keepalive_at = None
        if self.persistent_keepalive is not None:
            self._persistent_at = now + self.persistent_keepalive

    def _enqueue(self, packet: bytes, now: float) -> None:
        if len(self._queue) >= MAX_QUEUED_PACKETS:
            self._queue.popleft()
            self.drops["queue_full"] += 1
        self._queue.append(packet)
        if self._pending is None or (
            self._last_initiation_sent is not None
            and now - self._last_initiation_sent >= REKEY_TIMEOUT
        ):
            self._initiate(now, retry=False)

    def _flush_queue(self, now: float) -> bool:
        sent = False
        while self._queue and self._current is not None:
            out = self.encapsulate(self._queue.popleft(), now)
            if out is None:
                break
            self._push_tx(out, now)
            sent = True
        return sent

    def _send_keepalive(self, now: float) -> None:
        s = self._current
        if s is None or now >= s.reject_at:
            self._initiate(now, retry=False)
            return
        out = self.encapsulate(b"", now)
        if out is not None:
            self._push_tx(out, now)

    # -------------------------------------------------------------- outputs

    def poll_transmit(self) -> bytes | None:
        """Next datagram to send to the peer (handshakes, keepalives, flushed packets)."""
        return self._tx.popleft() if self._tx else None

    def poll_event(self) -> TunnelEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """The earliest deadline at which handle_timeout() has work (now if output is queued)."""
        if self._tx or self._events:
            return self._out_at
        best: float | None = None
        for t in (
            self._retransmit_at,
            self._keepalive_at,
            self._new_handshake_at,
            self._persistent_at,
            self._current.reject_at if self._current is not None else None,
            self._next.reject_at if self._next is not None else None,
        ):
            if t is not None and (best is None or t < best):
                best = t
        return best

    # --------------------------------------------------------------- timers

    def handle_timeout(self, now: float) -> None:
        """Fire every timer whose deadline is at or before ``now``."""
        self._expire_sessions(now)

        if self._retransmit_at is not None and now >= self._retransmit_at:
            if now - self._attempt_started >= self.rekey_attempt_time:
                self._give_up(now)
            else:
                log.debug("wg handshake retransmit")
                self._send_initiation(now)

        if self._new_handshake_at is not None and now >= self._new_handshake_at:
            # Whitepaper §6.5: we sent data and heard nothing back for 15 s.
            self._new_handshake_at = None
            log.debug("wg no reply to data, starting a new handshake")
            self._initiate(now, retry=False)

        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._keepalive_at = None
            if self._current is not None:
                self._send_keepalive(now)

        if self._persistent_at is not None and now >= self._persistent_at:
            self._persistent_at = None
            self._send_keepalive(now)

    def _expire_sessions(self, now: float) -> None:
        if self._previous is not None and now >= self._previous.reject_at:
            self._previous = None
        if self._next is not None and now >= self._next.reject_at:
            self._next = None
        cur = self._current
        if cur is not None and now >= cur.reject_at:
            self._current = None
            self._keepalive_at = None
            self._new_handshake_at = None
            log.debug("wg session keys expired")
            if self._pending is None and not self._expired_reported:
                self._expired_reported = True
                self._events.append(ConnectionExpired(now, "keys_rejected"))
                self._out_at = now

    def _give_up(self, now: float) -> None:
        self._pending = None
        self._retransmit_at = None
        if self._queue:
            self.drops["expired"] += len(self._queue)
            self._queue.clear()
        log.debug("wg handshake did not complete, giving up")
        if not self._expired_reported:
            self._expired_reported = True
            self._events.append(ConnectionExpired(now, "handshake_timeout"))
            self._out_at = now
