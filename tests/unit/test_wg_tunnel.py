"""Two Tunnels wired in memory with a virtual clock: handshakes, data, timers, drops."""

from __future__ import annotations

import struct

import pytest

from firezone.logs import TRACE
from firezone.proto.wireguard import (
    ConnectionExpired,
    HandshakeCompleted,
    Tunnel,
    b64encode_key,
    parse_initiation_sender,
    parse_message,
)
from firezone.proto.wireguard.handshake import tai64n
from firezone.proto.wireguard.messages import HandshakeInitiation, TransportData
from firezone.proto.wireguard.session import REPLAY_WINDOW
from firezone.proto.wireguard.testing import TunnelPair, ipv4_packet, ipv6_packet
from firezone.proto.wireguard.timers import (
    MAX_QUEUED_PACKETS,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
)

PKT = ipv4_packet("10.0.0.1", "10.0.0.2", b"hello world")


def established(**kwargs: object) -> TunnelPair:
    pair = TunnelPair(**kwargs)  # type: ignore[arg-type]
    assert pair.send("a", PKT) == PKT
    assert pair.a.is_established and pair.b.is_established
    return pair


def transport_from(pair: TunnelPair, side: str, packet: bytes = PKT) -> bytes:
    """Encapsulate without delivering."""
    out = pair.tunnel(side).encapsulate(packet, pair.now)
    assert out is not None
    return out


# --------------------------------------------------------------------------- handshake


def test_first_packet_is_queued_and_starts_a_handshake() -> None:
    pair = TunnelPair()
    assert pair.a.encapsulate(PKT, pair.now) is None
    init = pair.a.poll_transmit()
    assert init is not None and len(init) == 148 and init[:4] == b"\x01\x00\x00\x00"
    assert pair.a.queued_packets == 1


def test_handshake_then_data_both_ways() -> None:
    pair = established()
    back = ipv4_packet("10.0.0.2", "10.0.0.1", b"reply")
    assert pair.send("b", back) == back
    assert pair.events["a"] == [HandshakeCompleted(pair.now, True)]
    assert pair.events["b"] == [HandshakeCompleted(pair.now, False)]
    assert pair.a.last_handshake_unix == pytest.approx(1_700_000_000.0)
    assert pair.a.rx_bytes > 0 and pair.a.tx_bytes > 0
    assert not pair.a.drops and not pair.b.drops


def test_ipv6_and_padding_are_stripped() -> None:
    pair = established()
    for n in (0, 1, 15, 16, 17, 1200):
        p6 = ipv6_packet("fd00::1", "fd00::2", bytes(range(256)) * 5)[: 40 + n]
        p6 = p6[:4] + struct.pack(">H", n) + p6[6:]
        assert pair.send("a", p6) == p6
        p4 = ipv4_packet("10.0.0.1", "10.0.0.2", bytes(n))
        assert pair.send("b", p4) == p4


def test_transport_datagram_is_padded_to_16() -> None:
    pair = established()
    out = transport_from(pair, "a", ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    assert len(out) == 16 + 32 + 16  # header + 21 bytes padded to 32 + tag


def test_responder_needs_key_confirmation_before_sending() -> None:
    pair = TunnelPair()
    pair.filter = lambda side, dg: not (side == "a" and dg[0] == 4)  # hold a's data
    pair.a.force_handshake(pair.now)
    pair.pump()
    assert pair.a.is_established
    assert not pair.b.is_established  # responder: session is "next" until a speaks
    assert pair.b.encapsulate(PKT, pair.now) is None
    assert pair.b.queued_packets == 1
    pair.filter = lambda side, dg: True
    pair.send("a", PKT)
    assert pair.b.is_established
    assert pair.received["a"] == [PKT]  # b's queued packet was flushed after confirmation


def test_psk_on_both_sides_works() -> None:
    psk = bytes(range(32))
    pair = established(psk_a=psk, psk_b=psk)
    assert pair.send("b", PKT) == PKT


def test_psk_mismatch_fails_and_is_counted() -> None:
    pair = TunnelPair(psk_a=bytes(32), psk_b=b"\x01" * 32)
    assert pair.send("a", PKT) is None
    assert pair.a.drops["decrypt"] == 1  # the response does not open
    assert not pair.a.is_established and not pair.b.is_established


def test_psk_only_on_one_side_fails() -> None:
    pair = TunnelPair(psk_a=b"\x07" * 32)
    assert pair.send("a", PKT) is None
    assert pair.a.drops["decrypt"] == 1


def test_initiation_for_another_key_is_dropped_by_mac1() -> None:
    pair = TunnelPair()
    other = TunnelPair(seed=9)
    other.a.force_handshake(other.now)
    init = other.a.poll_transmit()
    assert init is not None
    assert pair.b.decapsulate(init, pair.now) is None
    assert pair.b.drops["mac1"] == 1


def test_initiation_from_unknown_static_key_is_dropped() -> None:
    pair = TunnelPair()
    stranger = Tunnel(
        static_private=b"\x48" * 32, peer_public=pair.b_public, preshared_key=None, index=5,
        rng=pair.rng, now=pair.now, unix_time=1.7e9,
    )  # fmt: skip
    stranger.force_handshake(pair.now)
    init = stranger.poll_transmit()
    assert init is not None
    assert pair.b.decapsulate(init, pair.now) is None
    assert pair.b.drops["peer"] == 1
    assert pair.b.poll_transmit() is None


def test_replayed_initiation_is_rejected_by_timestamp() -> None:
    pair = TunnelPair()
    pair.a.force_handshake(pair.now)
    init = pair.a.poll_transmit()
    assert init is not None
    pair.b.decapsulate(init, pair.now)
    assert pair.b.poll_transmit() is not None
    pair.now += 1
    pair.b.decapsulate(init, pair.now)
    assert pair.b.drops["timestamp"] == 1
    assert pair.b.poll_transmit() is None


def test_initiation_flood_is_rate_limited() -> None:
    pair = TunnelPair()
    pair.a.force_handshake(pair.now)
    first = pair.a.poll_transmit()
    pair.a.force_handshake(pair.now + 0.001)
    second = pair.a.poll_transmit()
    assert first and second
    pair.b.decapsulate(first, pair.now)
    pair.b.decapsulate(second, pair.now + 0.005)  # 5 ms later: more than 50/s
    assert pair.b.drops["rate_limited"] == 1


def test_initiation_timestamps_increase_even_within_one_clock_step() -> None:
    pair = TunnelPair()
    stamps = []
    for i in range(3):
        pair.a.force_handshake(pair.now + i * 0.001)
        init = pair.a.poll_transmit()
        assert init is not None
        stamps.append(init)
    # Each one is accepted by b (timestamps strictly increase), given enough spacing.
    for i, init in enumerate(stamps):
        pair.b.decapsulate(init, pair.now + i)
    assert pair.b.drops["timestamp"] == 0


def test_tai64n_layout() -> None:
    ts = tai64n(1.5)
    assert len(ts) == 12
    secs, nanos = struct.unpack(">QI", ts)
    assert secs == 0x400000000000000A + 1
    assert nanos <= 500_000_000 and nanos > 480_000_000  # whitened to 2^24 ns steps
    assert tai64n(2.0) > tai64n(1.99)


def test_handshake_collision_converges() -> None:
    pair = TunnelPair()
    pair.a.force_handshake(pair.now)
    pair.b.force_handshake(pair.now)
    pair.pump()
    assert pair.a.is_established and pair.b.is_established
    assert pair.send("a", PKT) == PKT
    assert pair.send("b", PKT) == PKT


def test_parse_initiation_sender_returns_initiator_key() -> None:
    pair = TunnelPair()
    pair.a.force_handshake(pair.now)
    init = pair.a.poll_transmit()
    assert init is not None
    assert parse_initiation_sender(pair.b_private, init) == pair.a_public
    assert parse_initiation_sender(pair.a_private, init) is None  # not addressed to a
    assert parse_initiation_sender(pair.b_private, init[:-1]) is None
    assert parse_initiation_sender(pair.b_private, b"") is None


# ------------------------------------------------------------------ transport and drops


def test_replayed_transport_packet_is_dropped() -> None:
    pair = established()
    out = transport_from(pair, "a")
    assert pair.b.decapsulate(out, pair.now) == PKT
    assert pair.b.decapsulate(out, pair.now) is None
    assert pair.b.drops["replay"] == 1


def test_reordered_packets_within_window_are_accepted() -> None:
    pair = established()
    outs = [
        transport_from(pair, "a", ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i])))
        for i in range(50)
    ]
    order = list(reversed(outs[25:])) + outs[:25]
    got = [pair.b.decapsulate(o, pair.now) for o in order]
    assert all(g is not None for g in got)
    assert pair.b.drops["replay"] == 0
    assert all(pair.b.decapsulate(o, pair.now) is None for o in outs)
    assert pair.b.drops["replay"] == 50


def test_packet_older_than_window_is_dropped() -> None:
    pair = established()
    old = transport_from(pair, "a")
    for _ in range(REPLAY_WINDOW + 1):
        pair.a.encapsulate(PKT, pair.now)  # burn counters without delivering
    pair.b.decapsulate(transport_from(pair, "a"), pair.now)
    assert pair.b.decapsulate(old, pair.now) is None
    assert pair.b.drops["replay"] == 1


def test_corrupted_tag_is_dropped_and_counted() -> None:
    pair = established()
    out = bytearray(transport_from(pair, "a"))
    out[-1] ^= 1
    assert pair.b.decapsulate(bytes(out), pair.now) is None
    assert pair.b.drops["decrypt"] == 1


def test_corrupted_ciphertext_is_dropped() -> None:
    pair = established()
    out = bytearray(transport_from(pair, "a"))
    out[20] ^= 0x80
    assert pair.b.decapsulate(bytes(out), pair.now) is None
    assert pair.b.drops["decrypt"] == 1


def test_corrupted_counter_is_dropped_and_does_not_move_the_window() -> None:
    pair = established()
    out = bytearray(transport_from(pair, "a"))
    out[8:16] = struct.pack("<Q", 1 << 40)
    assert pair.b.decapsulate(bytes(out), pair.now) is None
    assert pair.b.drops["decrypt"] == 1
    assert pair.send("a", PKT) == PKT  # the forged counter did not advance the window


def test_counter_beyond_reject_after_messages_is_dropped() -> None:
    pair = established()
    out = bytearray(transport_from(pair, "a"))
    out[8:16] = struct.pack("<Q", (1 << 64) - 1)
    assert pair.b.decapsulate(bytes(out), pair.now) is None
    assert pair.b.drops["counter"] == 1


def test_unknown_receiver_index_is_dropped() -> None:
    pair = established()
    out = bytearray(transport_from(pair, "a"))
    out[4:8] = b"\xff\xff\xff\xff"
    assert pair.b.decapsulate(bytes(out), pair.now) is None
    assert pair.b.drops["index"] == 1


def test_decrypted_garbage_that_is_not_ip_is_dropped() -> None:
    pair = established()
    out = transport_from(pair, "a", b"\x00" * 40)
    assert pair.b.decapsulate(out, pair.now) is None
    assert pair.b.drops["malformed"] == 1
    lying = bytearray(PKT)
    lying[2:4] = struct.pack(">H", 500)  # says longer than it is
    assert pair.b.decapsulate(transport_from(pair, "a", bytes(lying)), pair.now) is None
    assert pair.b.drops["malformed"] == 2


def test_keepalive_is_not_returned_to_the_tun() -> None:
    pair = established()
    ka = transport_from(pair, "a", b"")
    assert len(ka) == 32
    assert pair.b.decapsulate(ka, pair.now) is None
    assert not pair.b.drops


def test_short_and_unknown_datagrams_are_counted_not_raised() -> None:
    pair = established()
    for junk in (b"", b"\x04", b"\x09\x00\x00\x00" + bytes(100), b"\x01\x01\x00\x00" + bytes(144)):
        assert pair.b.decapsulate(junk, pair.now) is None
    assert pair.b.drops["malformed"] == 4


def test_memoryview_input_is_accepted() -> None:
    pair = established()
    out = transport_from(pair, "a", memoryview(bytearray(PKT)))  # type: ignore[arg-type]
    assert pair.b.decapsulate(memoryview(out), pair.now) == PKT


# ------------------------------------------------------------------------------ timers


def test_rekey_after_120_seconds_of_sending() -> None:
    pair = established()
    pair.advance(119)
    handshakes_before = len(pair.events["a"])
    assert pair.send("a", PKT) == PKT
    assert len(pair.events["a"]) == handshakes_before  # not yet
    pair.advance(1.5)
    assert pair.send("a", PKT) == PKT
    assert pair.events["a"][-1] == HandshakeCompleted(pair.now, True)
    assert len([e for e in pair.events["a"] if isinstance(e, HandshakeCompleted)]) == 2
    # The new session carries traffic both ways.
    assert pair.send("b", PKT) == PKT


def test_responder_does_not_rekey_on_send() -> None:
    pair = established()
    pair.filter = lambda side, dg: side == "b"  # a stays silent on the wire
    pair.advance(130)
    pair.send("b", PKT)
    assert not [dg for dg in pair.sent["b"] if dg[0] == 1]
    assert not [dg for dg in pair.sent["a"][1:] if dg[0] == 1]


def test_initiator_rekeys_on_receive_after_165s() -> None:
    pair = established()
    pair.b.set_persistent_keepalive(20.0, pair.now)  # a only ever receives keepalives
    inits = len([dg for dg in pair.sent["a"] if dg[0] == 1])
    pair.advance(164)
    assert len([dg for dg in pair.sent["a"] if dg[0] == 1]) == inits
    pair.advance(25)
    assert len([dg for dg in pair.sent["a"] if dg[0] == 1]) == inits + 1
    assert len(pair.events["a"]) == 2 and pair.events["a"][-1].initiated_by_us  # type: ignore[attr-defined]
    assert pair.a.is_established and pair.b.is_established


def test_keys_expire_after_180_seconds_without_rekey() -> None:
    pair = established()
    pair.filter = lambda side, dg: dg[0] == 4  # handshakes get lost from now on
    pair.advance(179)
    assert pair.a.is_established
    pair.advance(1.5)
    assert not pair.a.is_established and not pair.b.is_established
    assert any(isinstance(e, ConnectionExpired) for e in pair.events["b"])
    # An old packet is refused once its session is past REJECT_AFTER_TIME.
    assert pair.a.encapsulate(PKT, pair.now) is None


def test_stale_datagram_is_rejected_as_expired() -> None:
    pair = established()
    out = transport_from(pair, "a")
    pair.now += 181
    assert pair.b.decapsulate(out, pair.now) is None
    assert pair.b.drops["expired"] == 1


def test_idle_tunnel_emits_connection_expired_at_180s() -> None:
    pair = established()
    pair.advance(200)
    exp = [e for e in pair.events["a"] if isinstance(e, ConnectionExpired)]
    assert len(exp) == 1 and exp[0].reason == "keys_rejected"
    assert exp[0].now == pytest.approx(1180.0)
    # Next packet re-handshakes.
    assert pair.send("a", PKT) == PKT
    assert pair.a.is_established


def test_handshake_retransmits_every_5s_then_gives_up_after_90s() -> None:
    pair = TunnelPair()
    pair.filter = lambda side, dg: False  # the peer is unreachable
    pair.a.encapsulate(PKT, pair.now)
    start = pair.now
    pair.advance(100)
    inits = [dg for dg in pair.sent["a"] if dg[0] == 1]
    assert 17 <= len(inits) <= 19  # one every REKEY_TIMEOUT (+ up to 1/3 s jitter) for 90 s
    exp = [e for e in pair.events["a"] if isinstance(e, ConnectionExpired)]
    assert len(exp) == 1 and exp[0].reason == "handshake_timeout"
    assert 90 <= exp[0].now - start <= 96
    assert pair.a.queued_packets == 0 and pair.a.drops["expired"] == 1
    assert pair.a.poll_timeout() is None


def test_rekey_attempt_time_is_configurable_for_ice() -> None:
    pair = TunnelPair(rekey_attempt_time=20.0)
    pair.filter = lambda side, dg: False
    pair.a.force_handshake(pair.now)
    pair.advance(30)
    exp = [e for e in pair.events["a"] if isinstance(e, ConnectionExpired)]
    assert len(exp) == 1 and 20 <= exp[0].now - 1000.0 <= 26


def test_lost_initiation_is_retried_and_queue_flushed() -> None:
    pair = TunnelPair()
    dropped = []

    def lose_first(side: str, dg: bytes) -> bool:
        if dg[0] == 1 and not dropped:
            dropped.append(dg)
            return False
        return True

    pair.filter = lose_first
    for i in range(3):
        assert pair.a.encapsulate(ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i])), pair.now) is None
    pair.advance(6)
    assert [p[-1] for p in pair.received["b"]] == [0, 1, 2]
    assert pair.a.is_established


def test_queue_is_bounded() -> None:
    pair = TunnelPair()
    pair.filter = lambda side, dg: False
    for _ in range(MAX_QUEUED_PACKETS + 10):
        pair.a.encapsulate(PKT, pair.now)
    assert pair.a.queued_packets == MAX_QUEUED_PACKETS
    assert pair.a.drops["queue_full"] == 10
    assert len([dg for dg in pair.a._tx if dg[0] == 1]) == 1  # one initiation, not 138


def test_passive_keepalive_after_receiving_data() -> None:
    pair = established()
    # b received a's packet and has sent nothing since: it answers with a keepalive at 10 s.
    pair.advance(9.9)
    assert not [dg for dg in pair.sent["b"] if len(dg) == 32]
    pair.advance(0.2)
    assert [dg for dg in pair.sent["b"] if len(dg) == 32]


def test_no_reply_to_data_starts_a_new_handshake_after_15s() -> None:
    pair = established()
    pair.filter = lambda side, dg: side == "a"  # b's replies are lost
    pair.send("a", PKT)
    n = len([dg for dg in pair.sent["a"] if dg[0] == 1])
    pair.advance(15.5)
    assert len([dg for dg in pair.sent["a"] if dg[0] == 1]) == n + 1


def test_persistent_keepalive() -> None:
    pair = TunnelPair(persistent_keepalive=25.0)
    assert pair.send("a", PKT) == PKT
    pair.advance(100)
    kas = [dg for dg in pair.sent["a"] if len(dg) == 32 and dg[0] == 4]
    assert len(kas) >= 3


def test_poll_timeout_is_none_when_idle_and_unconnected() -> None:
    pair = TunnelPair()
    assert pair.a.poll_timeout() is None
    pair.a.handle_timeout(pair.now + 1000)
    assert pair.a.poll_transmit() is None and pair.a.poll_event() is None


def test_poll_timeout_is_now_while_output_is_queued() -> None:
    pair = TunnelPair()
    pair.a.force_handshake(pair.now)
    assert pair.a.poll_timeout() == pair.now


def test_invalid_index_is_api_misuse() -> None:
    with pytest.raises(ValueError, match="24-bit"):
        Tunnel(
            static_private=bytes(32), peer_public=bytes(32), preshared_key=None, index=1 << 24,
            rng=TunnelPair().rng, now=0.0, unix_time=0.0,
        )  # fmt: skip


# --------------------------------------------------------------------- secrets hygiene


def test_keys_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    psk = b"\x5a" * 32
    with caplog.at_level(TRACE):
        pair = TunnelPair(psk_a=psk, psk_b=psk)
        pair.send("a", PKT)
        pair.send("b", PKT)
        pair.advance(200)
        pair.send("a", PKT)
        pair.filter = lambda side, dg: False
        pair.advance(200)
    assert caplog.records, "expected some log lines at TRACE"
    text = "\n".join(f"{r.getMessage()} {r.__dict__!r}" for r in caplog.records)
    for secret in (pair.a_private, pair.b_private, psk):
        for form in (secret.hex(), b64encode_key(secret), repr(secret)):
            assert form not in text
    assert "redacted" in repr(pair.a._local)


def test_parse_message_understands_what_tunnels_send() -> None:
    pair = established()
    init_dg = next(dg for dg in pair.sent["a"] if dg[0] == 1)
    msg = parse_message(init_dg)
    assert isinstance(msg, HandshakeInitiation) and msg.to_bytes() == init_dg
    data_dg = next(dg for dg in pair.sent["a"] if dg[0] == 4)
    tmsg = parse_message(data_dg)
    assert isinstance(tmsg, TransportData) and tmsg.counter == 0


def test_rekey_after_messages_triggers_a_handshake() -> None:
    pair = established()
    cur = pair.a._current
    assert cur is not None
    cur.send_counter = REKEY_AFTER_MESSAGES
    inits = len([dg for dg in pair.sent["a"] if dg[0] == 1])
    pair.now += 6  # past the 5 s initiation rate limit
    out = pair.a.encapsulate(PKT, pair.now)
    assert out is not None  # the old keys still send while rekeying
    assert any(dg[0] == 1 for dg in pair.a._tx)
    pair.pump()
    assert len([dg for dg in pair.sent["a"] if dg[0] == 1]) == inits + 1
    assert pair.a._current is not cur


def test_reject_after_messages_stops_using_the_keys() -> None:
    pair = established()
    cur = pair.a._current
    assert cur is not None
    cur.send_counter = REJECT_AFTER_MESSAGES
    pair.now += 6
    assert pair.a.encapsulate(PKT, pair.now) is None
    assert pair.a.queued_packets == 1
    pair.pump()
    assert pair.received["b"][-1] == PKT  # delivered with the new session


def test_packets_in_flight_under_the_previous_session_still_decrypt() -> None:
    pair = established()
    in_flight = transport_from(pair, "a")
    pair.now += 6
    pair.a.force_handshake(pair.now)
    pair.pump()
    assert pair.a._previous is not None
    assert pair.b.decapsulate(in_flight, pair.now) == PKT
