"""Device: cryptokey routing over many peers, roaming, allowed-IP checks, cookies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto.rng import SeededRng
from firezone.proto.wireguard import (
    ConnectionExpired,
    Device,
    HandshakeCompleted,
    generate_private_key,
    public_key,
)
from firezone.proto.wireguard.testing import ipv4_packet, ipv6_packet

Endpoint = tuple[str, int]


class Net:
    """Devices on a virtual network, addressed by (host, port); delivery is instant."""

    def __init__(self) -> None:
        self.rng = SeededRng(11)
        self.now = 50.0
        self.devices: dict[Endpoint, Device] = {}
        self.tun: dict[Endpoint, list[bytes]] = {}
        self.wire: list[tuple[Endpoint, Endpoint, bytes]] = []
        self.nat: dict[Endpoint, Endpoint] = {}  # rewrite source addresses (roaming)
        self.events: dict[Endpoint, list[tuple[bytes, object]]] = {}

    def device(self, addr: Endpoint) -> Device:
        dev = Device(generate_private_key(self.rng), rng=self.rng, now=self.now, unix_time=1.7e9)
        self.devices[addr] = dev
        self.tun[addr] = []
        self.events[addr] = []
        return dev

    def _send(self, src: Endpoint, dg: bytes, dst: Endpoint) -> None:
        self.wire.append((src, dst, dg))
        target = self.devices.get(dst)
        if target is None:
            return
        pkt = target.handle_datagram(dg, self.nat.get(src, src), self.now)
        if pkt is not None:
            self.tun[dst].append(pkt)

    def pump(self) -> None:
        for _ in range(1000):
            moved = False
            for addr, dev in list(self.devices.items()):
                while (t := dev.poll_transmit()) is not None:
                    moved = True
                    self._send(addr, t[0], t[1])
                self.events[addr].extend(iter(dev.poll_event, None))
            if not moved:
                return
        raise AssertionError("network did not go quiet")

    def from_tun(self, addr: Endpoint, packet: bytes) -> None:
        out = self.devices[addr].handle_tun_packet(packet, self.now)
        if out is not None:
            self._send(addr, out[0], out[1])
        self.pump()

    def advance(self, dt: float) -> None:
        end = self.now + dt
        for _ in range(100_000):
            self.pump()
            ds = [d.poll_timeout() for d in self.devices.values()]
            nxt = min((d for d in ds if d is not None), default=None)
            if nxt is None or nxt > end:
                break
            self.now = max(self.now, nxt)
            for d in self.devices.values():
                d.handle_timeout(self.now)
        else:
            raise AssertionError("timers did not settle")
        self.now = end
        self.pump()


A, B, C = ("10.1.0.1", 51820), ("10.1.0.2", 51820), ("10.1.0.3", 51820)


def three() -> tuple[Net, Device, Device, Device]:
    net = Net()
    a, b, c = net.device(A), net.device(B), net.device(C)
    a.add_peer(b.public_key, allowed_ips=["10.0.0.2/32", "192.168.0.0/16"], endpoint=B, now=net.now)
    a.add_peer(
        c.public_key,
        allowed_ips=["10.0.0.3/32", "192.168.7.0/24", "fd00::/64"],
        endpoint=C,
        now=net.now,
    )
    b.add_peer(a.public_key, allowed_ips=["10.0.0.0/24"], now=net.now)  # no endpoint: learns it
    c.add_peer(a.public_key, allowed_ips=["0.0.0.0/0", "::/0"], endpoint=A, now=net.now)
    return net, a, b, c


def test_packets_reach_the_peer_owning_the_longest_prefix() -> None:
    net, a, b, c = three()
    p1 = ipv4_packet("10.0.0.1", "192.168.1.1", b"to b")
    p2 = ipv4_packet("10.0.0.1", "192.168.7.9", b"to c")
    p3 = ipv6_packet("fd00::1", "fd00::3", b"to c over v6")
    for p in (p1, p2, p3):
        net.from_tun(A, p)
    assert net.tun[B] == [p1]
    assert net.tun[C] == [p2, p3]
    assert a.route("192.168.7.200") is a.peer(c.public_key)
    assert a.route("192.168.8.1") is a.peer(b.public_key)
    assert a.route("172.16.0.1") is None


def test_no_route_is_dropped_and_counted() -> None:
    net, a, _, _ = three()
    assert a.handle_tun_packet(ipv4_packet("10.0.0.1", "8.8.8.8"), net.now) is None
    assert a.drops["no_route"] == 1
    assert a.handle_tun_packet(b"\x00" * 10, net.now) is None
    assert a.drops["malformed"] == 1


def test_responder_learns_endpoint_and_replies() -> None:
    net, a, b, _ = three()
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2", b"hi"))
    assert b.peer(a.public_key).endpoint == A  # type: ignore[union-attr]
    back = ipv4_packet("10.0.0.2", "10.0.0.1", b"hello back")
    net.from_tun(B, back)
    assert net.tun[A] == [back]
    assert b.peer(a.public_key).last_handshake_unix is not None  # type: ignore[union-attr]
    assert b.peer(a.public_key).rx_bytes > 0  # type: ignore[union-attr]


def test_roaming_updates_endpoint_on_authenticated_packets_only() -> None:
    net, a, b, _ = three()
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2", b"1"))
    net.nat[A] = ("203.0.113.9", 40000)
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2", b"2"))
    assert b.peer(a.public_key).endpoint == ("203.0.113.9", 40000)  # type: ignore[union-attr]
    # An unauthenticated datagram from elsewhere does not move it.
    fresh = a.handle_tun_packet(ipv4_packet("10.0.0.1", "10.0.0.2", b"3"), net.now)
    assert fresh is not None
    junk = bytearray(fresh[0])
    junk[-1] ^= 1
    b.handle_datagram(bytes(junk), ("198.51.100.1", 1), net.now)
    assert b.peer(a.public_key).endpoint == ("203.0.113.9", 40000)  # type: ignore[union-attr]
    assert b.drops["decrypt"] == 0 and b.peer(a.public_key).tunnel.drops["decrypt"] == 1  # type: ignore[union-attr]


def test_source_address_outside_allowed_ips_is_dropped() -> None:
    net, _a, b, _ = three()
    spoofed = ipv4_packet("10.9.9.9", "10.0.0.2", b"spoof")  # b allows only 10.0.0.0/24 from a
    net.from_tun(A, spoofed)
    assert net.tun[B] == []
    assert b.drops["allowed_ips"] == 1


def test_initiation_from_unknown_key_is_dropped() -> None:
    net, _a, b, _ = three()
    stranger = net.device(("10.1.0.9", 1))
    stranger.add_peer(b.public_key, allowed_ips=["10.0.0.2/32"], endpoint=B, now=net.now)
    net.from_tun(("10.1.0.9", 1), ipv4_packet("10.0.0.9", "10.0.0.2"))
    assert b.drops["unknown_peer"] == 1
    assert net.tun[B] == []


def test_unknown_index_and_garbage_are_counted() -> None:
    net, _, b, _ = three()
    assert b.handle_datagram(b"\x04\x00\x00\x00" + bytes(40), A, net.now) is None
    assert b.drops["index"] == 1
    assert b.handle_datagram(b"\x01\x00", A, net.now) is None
    assert b.handle_datagram(b"\x07\x00\x00\x00" + bytes(60), A, net.now) is None
    assert b.drops["malformed"] == 2
    assert b.handle_datagram(b"\x01\x00\x00\x00" + bytes(144), A, net.now) is None
    assert b.drops["mac1"] == 1


def test_events_name_the_peer() -> None:
    net, _a, b, _ = three()
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2"))
    ev = net.events[A][0]
    assert ev[0] == b.public_key and isinstance(ev[1], HandshakeCompleted)


def test_peer_without_endpoint_cannot_initiate() -> None:
    net, _a, b, _ = three()
    assert b.handle_tun_packet(ipv4_packet("10.0.0.2", "10.0.0.1"), net.now) is None
    assert b.poll_transmit() is None
    assert b.drops["no_endpoint"] == 1


def test_remove_peer_drops_its_routes() -> None:
    _net, a, b, c = three()
    a.remove_peer(c.public_key)
    assert a.route("192.168.7.1") is a.peer(b.public_key)
    assert a.route("fd00::3") is None
    assert len(a.peers) == 1
    a.remove_peer(c.public_key)  # no-op


def test_allowed_ip_moves_to_the_last_peer_claiming_it() -> None:
    net, a, b, c = three()
    a.add_peer(c.public_key, allowed_ips=["10.0.0.2/32"], endpoint=C, now=net.now)
    assert a.route("10.0.0.2") is a.peer(c.public_key)
    assert "10.0.0.2/32" not in a.peer(b.public_key).allowed_ips  # type: ignore[union-attr]
    assert a.peer(c.public_key).allowed_ips == ["10.0.0.2/32"]  # type: ignore[union-attr]


def test_add_peer_validates_input() -> None:
    net, a, _b, _ = three()
    with pytest.raises(ValueError, match="invalid allowed IP 'nope'"):
        a.add_peer(public_key(generate_private_key(net.rng)), allowed_ips=["nope"], now=net.now)
    with pytest.raises(ValueError, match="own public key"):
        a.add_peer(a.public_key, now=net.now)
    with pytest.raises(ValueError, match="32 bytes"):
        a.add_peer(b"short", now=net.now)


def test_changing_psk_restarts_the_tunnel() -> None:
    net, a, b, _ = three()
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2"))
    old = a.peer(b.public_key)
    new = a.add_peer(
        b.public_key, preshared_key=b"\x01" * 32, allowed_ips=["10.0.0.2/32"], now=net.now
    )
    assert new is not old and new.endpoint == B and not new.tunnel.is_established


def test_device_under_load_sends_cookie_to_source_then_accepts_mac2() -> None:
    net, _a, b, _ = three()
    b.rate_limiter.limit_per_second = 0
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    assert b.drops["cookie"] == 1
    assert [w for w in net.wire if w[0] == B and w[2][0] == 3 and w[1] == A]
    net.advance(6)
    assert net.tun[B] == [ipv4_packet("10.0.0.1", "10.0.0.2", b"x")]
    assert b.drops["cookie"] == 1


def test_rekey_and_expiry_through_devices() -> None:
    net, _a, _b, _ = three()
    p = ipv4_packet("10.0.0.1", "10.0.0.2", b"t")
    net.from_tun(A, p)
    for _ in range(10):
        net.advance(20)
        net.from_tun(A, p)
    handshakes = [e for _, e in net.events[A] if isinstance(e, HandshakeCompleted)]
    assert [e.now - 50 for e in handshakes] == [0, 120]  # type: ignore[attr-defined]
    net.advance(400)
    expired = [e for _, e in net.events[A] if isinstance(e, ConnectionExpired)]
    assert len(expired) == 1


def test_poll_timeout_covers_all_peers() -> None:
    net, a, _b, _c = three()
    assert a.poll_timeout() is None
    a.add_peer(public_key(generate_private_key(net.rng)), allowed_ips=["10.0.0.99/32"], now=net.now)
    a.handle_tun_packet(ipv4_packet("10.0.0.1", "10.0.0.99"), net.now)
    # The initiation had nowhere to go; the retransmit timer is what is left.
    assert a.drops["no_endpoint"] == 1
    t0 = a.poll_timeout()
    assert t0 is not None and net.now + 5 <= t0 <= net.now + 5.34
    net.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2"))
    t = a.poll_timeout()
    assert t is not None and net.now < t <= net.now + 180


_NET, _A, _B, _C = three()
_NET.from_tun(A, ipv4_packet("10.0.0.1", "10.0.0.2"))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from([1, 2, 3, 4]), st.binary(min_size=28, max_size=160)).map(
            lambda t: bytes([t[0], 0, 0, 0]) + t[1]
        ),
    )
)
def test_device_garbage_never_raises(data: bytes) -> None:
    before = _B.peer(_A.public_key).endpoint  # type: ignore[union-attr]
    assert _B.handle_datagram(data, ("198.51.100.9", 9), _NET.now) is None
    assert _B.peer(_A.public_key).endpoint == before  # type: ignore[union-attr]
    _B.handle_tun_packet(data, _NET.now)
    list(iter(_B.poll_transmit, None))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parse_initiation_sender_garbage(data: bytes) -> None:
    from firezone.proto.wireguard import parse_initiation_sender

    assert parse_initiation_sender(_B.private_key, data) is None
    assert parse_initiation_sender(b"short", b"\x01\x00\x00\x00" + data) is None


def test_ipv6_source_must_be_allowed_too() -> None:
    net, _a, _b, c = three()
    ok = ipv6_packet("fd00::9", "fd00::1", b"v6 from c")  # c's AllowedIPs on a: fd00::/64
    bad = ipv6_packet("fd01::9", "fd00::1", b"spoofed v6")
    net.from_tun(C, ok)
    net.from_tun(C, bad)
    assert net.tun[A] == [ok]
    assert net.devices[A].drops["allowed_ips"] == 1
    assert c.route("2001:db8::1") is not None  # c routes everything to a
