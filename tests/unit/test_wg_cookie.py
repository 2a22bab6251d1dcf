"""mac1/mac2, cookie replies and the under-load mode; garbage for every message parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.rng import SeededRng
from firezone.proto.wireguard import RateLimiter, parse_message
from firezone.proto.wireguard.cookie import RATE_LIMITED, CookieJar, address_bytes
from firezone.proto.wireguard.messages import CookieReply
from firezone.proto.wireguard.testing import TunnelPair, ipv4_packet

PKT = ipv4_packet("10.0.0.1", "10.0.0.2", b"under load")
SRC = ("192.0.2.1", 51820)


def loaded_pair(limit: int = 0) -> tuple[TunnelPair, RateLimiter]:
    pair = TunnelPair()
    limiter = RateLimiter(static_public=pair.b_public, rng=SeededRng(5), limit_per_second=limit)
    pair.b._rate_limiter = limiter
    return pair, limiter


def test_not_under_load_admits_without_mac2() -> None:
    pair, limiter = loaded_pair(limit=100)
    assert pair.send("a", PKT) == PKT
    assert limiter.cookies_sent == 0


def test_under_load_initiation_gets_a_cookie_then_succeeds_with_mac2() -> None:
    pair, limiter = loaded_pair(limit=0)
    assert pair.send("a", PKT) is None
    reply = next(dg for dg in pair.sent["b"])
    msg = parse_message(reply)
    assert isinstance(msg, CookieReply)
    first_init = pair.sent["a"][0]
    assert msg.receiver == int.from_bytes(first_init[4:8], "little")
    assert first_init[-16:] == bytes(16)  # no mac2 before the cookie
    assert pair.b.drops["cookie"] == 1
    assert not pair.b.is_established
    # The retransmitted initiation carries mac2 and is let through despite the load.
    pair.advance(6)
    retry = [dg for dg in pair.sent["a"] if dg[0] == 1][1]
    assert retry[-16:] != bytes(16)
    assert pair.a.is_established and pair.b.is_established
    assert pair.received["b"] == [PKT]
    assert limiter.cookies_sent == 1


def test_load_window_resets_after_one_second() -> None:
    _pair, limiter = loaded_pair(limit=2)
    assert not limiter.is_under_load(0.0)
    init = b"\x01" + bytes(147)
    assert limiter.check(init, SRC, 0.0) is None
    assert limiter.check(init, SRC, 0.1) is None
    assert limiter.check(init, SRC, 0.2) is not None  # third in the same second
    assert limiter.is_under_load(0.5)
    assert limiter.check(init, SRC, 1.2) is None


def test_cookie_is_bound_to_the_source_address() -> None:
    _, limiter = loaded_pair(limit=0)
    assert limiter.cookie(address_bytes(SRC)) != limiter.cookie(address_bytes(("192.0.2.1", 1)))
    assert limiter.cookie(address_bytes(SRC)) != limiter.cookie(
        address_bytes(("2001:db8::1", 51820))
    )
    assert (
        address_bytes(("2001:db8::1", 1))
        == bytes.fromhex("20010db8" + "00" * 11 + "01") + b"\x00\x01"
    )


def test_mac2_from_another_address_gets_a_new_cookie() -> None:
    pair = TunnelPair()
    limiter = RateLimiter(static_public=pair.b_public, rng=SeededRng(1), limit_per_second=0)
    jar = CookieJar()
    pair.a.force_handshake(pair.now)
    init = pair.a.poll_transmit()
    assert init is not None
    reply = limiter.check(init, SRC, pair.now)
    assert reply is not None
    assert jar.consume_reply(pair.a._peer.cookie_key, reply, pair.now) is False  # no mac1 sent
    jar.last_mac1 = init[116:132]
    assert jar.consume_reply(pair.a._peer.cookie_key, reply, pair.now)
    with_mac2 = jar.add_macs(pair.a._peer.mac1_key, init, pair.now)
    assert limiter.check(with_mac2, SRC, pair.now) is None
    assert limiter.check(with_mac2, ("198.51.100.7", 51820), pair.now) is not None


def test_cookie_expires_after_two_minutes() -> None:
    jar = CookieJar()
    jar._cookie, jar._cookie_at = b"c" * 16, 0.0
    assert jar.has_cookie(119.0)
    assert not jar.has_cookie(120.0)
    assert jar.add_macs(b"k" * 32, bytes(148), 121.0)[-16:] == bytes(16)


def test_secret_rotates_every_two_minutes() -> None:
    _, limiter = loaded_pair()
    limiter.handle_timeout(0.0)
    before = limiter.cookie(b"x")
    limiter.handle_timeout(60.0)
    assert limiter.cookie(b"x") == before
    limiter.handle_timeout(121.0)
    assert limiter.cookie(b"x") != before


def test_forged_cookie_reply_is_dropped() -> None:
    pair, _ = loaded_pair(limit=0)
    pair.a.force_handshake(pair.now)
    init = pair.a.poll_transmit()
    assert init is not None
    receiver = int.from_bytes(init[4:8], "little")
    forged = CookieReply(receiver, bytes(24), bytes(32)).to_bytes()
    assert pair.a.decapsulate(forged, pair.now) is None
    assert pair.a.drops["cookie"] == 1
    stray = CookieReply(receiver ^ 1, bytes(24), bytes(32)).to_bytes()
    pair.a.decapsulate(stray, pair.now)
    assert pair.a.drops["index"] == 1


def test_bad_mac1_is_dropped_before_load_accounting() -> None:
    pair, limiter = loaded_pair(limit=0)
    pair.a.force_handshake(pair.now)
    init = bytearray(pair.a.poll_transmit() or b"")
    init[120] ^= 1
    pair.b.decapsulate(bytes(init), pair.now)
    assert pair.b.drops["mac1"] == 1
    assert limiter.cookies_sent == 0


# ------------------------------------------------------------------ garbage everywhere

LENGTHS = {1: 148, 2: 92, 3: 64}


@st.composite
def shaped_garbage(draw: st.DrawFn) -> bytes:
    mtype = draw(st.sampled_from([1, 2, 3, 4]))
    if mtype == 4:
        body = draw(st.binary(min_size=28, max_size=200))
    else:
        body = draw(st.binary(min_size=LENGTHS[mtype] - 4, max_size=LENGTHS[mtype] - 4))
    return bytes([mtype, 0, 0, 0]) + body


_PAIR = TunnelPair(seed=77)
assert _PAIR.send("a", PKT) == PKT
_LOADED, _ = loaded_pair(limit=0)


@settings(max_examples=300, deadline=None)
@given(st.one_of(shaped_garbage(), st.binary(max_size=300)))
def test_garbage_never_raises_and_is_counted(data: bytes) -> None:
    for tunnel in (_PAIR.a, _PAIR.b, _LOADED.b):
        before = sum(tunnel.drops.values())
        assert tunnel.decapsulate(data, _PAIR.now, SRC) is None
        assert sum(tunnel.drops.values()) == before + 1
        while tunnel.poll_transmit() is not None:
            pass
    assert _PAIR.send("a", PKT) == PKT  # still works afterwards


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 147), st.integers(0, 7))
def test_any_bit_flip_in_an_initiation_is_rejected(byte: int, bit: int) -> None:
    pair = TunnelPair(seed=3)
    pair.a.force_handshake(pair.now)
    init = bytearray(pair.a.poll_transmit() or b"")
    init[byte] ^= 1 << bit
    pair.b.decapsulate(bytes(init), pair.now)
    if byte >= 132:
        # mac2 is only checked under load; without load the initiation is still valid.
        assert pair.b.poll_transmit() is not None
    else:
        assert pair.b.poll_transmit() is None
        assert sum(pair.b.drops.values()) == 1


def test_valid_mac2_is_still_limited_per_source_under_load() -> None:
    pair = TunnelPair()
    limiter = RateLimiter(static_public=pair.b_public, rng=SeededRng(1), limit_per_second=0)
    jar = CookieJar()
    pair.a.force_handshake(pair.now)
    init = pair.a.poll_transmit()
    assert init is not None
    jar.last_mac1 = init[116:132]
    reply = limiter.check(init, SRC, pair.now)
    assert reply and jar.consume_reply(pair.a._peer.cookie_key, reply, pair.now)
    with_mac2 = jar.add_macs(pair.a._peer.mac1_key, init, pair.now)
    verdicts = [limiter.check(with_mac2, SRC, pair.now) for _ in range(8)]
    assert verdicts[:5] == [None] * 5  # the burst
    assert verdicts[5:] == [RATE_LIMITED] * 3
    assert limiter.rate_limited == 3
    assert limiter.check(with_mac2, SRC, pair.now + 0.06) is None  # refilled 20/s


def test_address_bytes_tolerates_odd_hosts() -> None:
    assert address_bytes(None) == b""
    assert address_bytes(("fe80::1%eth0", 5))[-2:] == b"\x00\x05"
    assert address_bytes(("not-an-ip", 70000)) == b"not-an-ip" + (70000 & 0xFFFF).to_bytes(2, "big")
