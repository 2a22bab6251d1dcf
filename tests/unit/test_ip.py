"""firezone.proto.ip: parse/build round trips, checksums, in-place rewrites, ICMP errors, p2p control."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firezone.proto import ip

# Packets the Linux kernel wrote to a TUN device (no checksum offload, so every checksum was computed
# in software by the kernel): UDP/IPv4, UDP/IPv6, TCP SYN/IPv4 with options, ICMP echo, ICMPv6 echo.
KERNEL_UDP4 = bytes.fromhex(
    "45000024aba3400040117a5d0a6300010a6300029c4014e900108f6f68656c6c6f20667a"
)
KERNEL_UDP6 = bytes.fromhex(
    "6006137800111140fd990000000000000000000000000001fd9900000000000000000000000000029c4114e9001172fe68656c6c6f20667a36"
)
KERNEL_TCP4_SYN = bytes.fromhex(
    "4500003c5ec640004006c72d0a6300010a6300029c4200505582a58400000000a002faf0ba330000020405b40402080a818464f2000000000103030a"
)
KERNEL_ICMP4_ECHO = bytes.fromhex(
    "450000280cc74000400119460a6300010a63000208003eb652e20001666666666666666666666666"
)
KERNEL_ICMP6_ECHO = bytes.fromhex(
    "60046b6000143a40fd990000000000000000000000000001fd9900000000000000000000000000028000137252e30001000102030405060708090a0b"
)
KERNEL_PACKETS = [KERNEL_UDP4, KERNEL_UDP6, KERNEL_TCP4_SYN, KERNEL_ICMP4_ECHO, KERNEL_ICMP6_ECHO]


def rfc1071(data: bytes) -> int:
    """The textbook RFC 1071 loop, as the reference for the fast implementation."""
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# --- checksums -----------------------------------------------------------------------------------
def test_ipv4_header_checksum_of_the_classic_example() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ip.checksum(header) == 0xB861


@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    assert ip.checksum(data) == rfc1071(data)


@pytest.mark.parametrize("raw", KERNEL_PACKETS, ids=["udp4", "udp6", "tcp4", "icmp4", "icmp6"])
def test_kernel_packets_verify_and_recompute_identically(raw: bytes) -> None:
    p = ip.parse(raw)
    assert p is not None
    assert p.checksums_ok()
    p.recompute_checksums()
    assert bytes(p.buf) == raw


@pytest.mark.parametrize("raw", KERNEL_PACKETS, ids=["udp4", "udp6", "tcp4", "icmp4", "icmp6"])
def test_corrupted_kernel_packets_fail_verification(raw: bytes) -> None:
    bad = bytearray(raw)
    bad[-1] ^= 0x40
    p = ip.parse(bad)
    assert p is not None and not p.checksums_ok()


def test_kernel_packet_fields() -> None:
    u = ip.parse(KERNEL_UDP4)
    assert u is not None
    assert (u.version, u.proto, u.src_ip, u.sport, u.dst_ip, u.dport) == (
        4,
        17,
        "10.99.0.1",
        40000,
        "10.99.0.2",
        5353,
    )
    assert u.payload == b"hello fz"
    t = ip.parse(KERNEL_TCP4_SYN)
    assert t is not None and t.tcp_flags == ip.TCP_SYN and t.dport == 80 and t.payload == b""
    e = ip.parse(KERNEL_ICMP6_ECHO)
    assert e is not None and e.is_icmp_echo and e.icmp_id == 0x52E3 and not e.is_icmp_error


# --- building ------------------------------------------------------------------------------------
def test_builders_reproduce_the_kernel_udp_packet() -> None:
    built = bytearray(ip.build_udp("10.99.0.1", "10.99.0.2", 40000, 5353, b"hello fz"))
    built[4:6] = KERNEL_UDP4[4:6]  # the kernel's IP identification
    p = ip.parse(built)
    assert p is not None
    p.recompute_checksums()
    assert bytes(p.buf) == KERNEL_UDP4


def test_builders_reproduce_the_kernel_udp6_packet() -> None:
    built = bytearray(ip.build_udp("fd99::1", "fd99::2", 40001, 5353, b"hello fz6"))
    built[0:4] = KERNEL_UDP6[0:4]  # flow label
    assert bytes(built) == KERNEL_UDP6


@pytest.mark.parametrize(("src", "dst"), [("10.0.0.1", "10.0.0.2"), ("fd00::1", "2001:db8::2")])
def test_build_parse_round_trip(src: str, dst: str) -> None:
    for raw in (
        ip.build_udp(src, dst, 1, 65535, b"x" * 33),
        ip.build_tcp(src, dst, 1234, 443, b"payload", flags=ip.TCP_ACK | ip.TCP_PSH, seq=7, ack=9),
        ip.build_echo(src, dst, 77, 3, b"ping"),
    ):
        p = ip.parse(raw)
        assert p is not None and p.checksums_ok()
        assert (p.src_ip, p.dst_ip) == (
            str(ipaddress.ip_address(src)),
            str(ipaddress.ip_address(dst)),
        )
        assert p.tobytes() == raw


def test_udp_zero_checksum_is_sent_as_all_ones() -> None:
    # Find a payload whose UDP checksum computes to zero: RFC 768 sends it as 0xFFFF.
    for i in range(70000):
        raw = ip.build_udp("10.0.0.1", "10.0.0.2", 1, 2, i.to_bytes(3, "big"))
        if raw[26:28] == b"\xff\xff":
            p = ip.parse(raw)
            assert p is not None and p.checksums_ok()
            return
    pytest.fail("no payload gave a zero checksum")


def test_parse_rejects_truncated_and_non_ip() -> None:
    assert ip.parse(b"") is None
    assert ip.parse(KERNEL_UDP4[:-1]) is None  # total length says more
    assert ip.parse(b"\x50" + bytes(40)) is None  # version 5
    assert ip.parse(KERNEL_UDP6[:45]) is None


def test_trailing_bytes_beyond_total_length_are_ignored() -> None:
    p = ip.parse(KERNEL_UDP4 + b"\x00" * 6)
    assert p is not None and p.end == len(KERNEL_UDP4) and p.checksums_ok()
    assert p.tobytes() == KERNEL_UDP4


def test_ipv4_non_first_fragment_has_no_ports() -> None:
    raw = bytearray(KERNEL_UDP4)
    raw[6:8] = b"\x00\x10"
    p = ip.parse(raw)
    assert p is not None and p.l4 == -1 and not p.has_ports


def test_ipv6_extension_headers_are_walked() -> None:
    udp = ip.parse(ip.build_udp("fd00::1", "fd00::2", 10, 20, b"abc"))
    assert udp is not None
    hop = bytes((ip.PROTO_UDP, 0)) + bytes(6)  # hop-by-hop, 8 bytes, next = UDP
    raw = bytearray(ip.build_ip("fd00::1", "fd00::2", 0, hop + udp.l4_bytes))
    p = ip.parse(raw)
    assert (
        p is not None and p.proto == ip.PROTO_UDP and p.l4 == 48 and (p.sport, p.dport) == (10, 20)
    )
    assert p.checksums_ok()


# --- rewriting -----------------------------------------------------------------------------------
def _recomputed(p: ip.Packet) -> bytes:
    q = ip.parse(bytes(p.buf))
    assert q is not None
    q.recompute_checksums()
    return bytes(q.buf)


addr4 = st.integers(0, 2**32 - 1).map(lambda i: ipaddress.IPv4Address(i).packed)
addr6 = st.integers(0, 2**128 - 1).map(lambda i: ipaddress.IPv6Address(i).packed)
port = st.integers(0, 65535)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    v6 = draw(st.booleans())
    a = addr6 if v6 else addr4
    src, dst = draw(a), draw(a)
    payload = draw(st.binary(max_size=64))
    kind = draw(st.sampled_from(["udp", "tcp", "echo"]))
    if kind == "udp":
        return ip.build_udp(src, dst, draw(port), draw(port), payload)
    if kind == "tcp":
        return ip.build_tcp(
            src, dst, draw(port), draw(port), payload, flags=draw(st.integers(0, 63))
        )
    return ip.build_echo(src, dst, draw(port), draw(port), payload)


@settings(max_examples=300)
@given(packets(), st.data())
def test_rewrite_with_incremental_checksum_equals_full_recompute(
    raw: bytes, data: st.DataObject
) -> None:
    p = ip.parse(raw)
    assert p is not None
    a = addr6 if p.version == 6 else addr4
    p.set_src(data.draw(a))
    p.set_dst(data.draw(a))
    if p.is_icmp_echo:
        p.set_icmp_id(data.draw(port))
    else:
        p.set_sport(data.draw(port))
        p.set_dport(data.draw(port))
    assert p.checksums_ok()
    assert bytes(p.buf) == _recomputed(p)


def test_rewrite_keeps_udp4_without_checksum_unchecked() -> None:
    raw = bytearray(ip.build_udp("10.0.0.1", "10.0.0.2", 1, 2, b"x"))
    raw[26:28] = b"\x00\x00"
    p = ip.parse(raw)
    assert p is not None
    p.set_dst(ip.addr_bytes("10.9.9.9"))
    assert p.buf[26:28] == b"\x00\x00" and p.checksums_ok()


def test_rewrite_rejects_wrong_family() -> None:
    p = ip.parse(KERNEL_UDP4)
    assert p is not None
    with pytest.raises(ValueError, match="family"):
        p.set_dst(ip.addr_bytes("fd00::1"))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_never_raises(data: bytes) -> None:
    for quoted in (False, True):
        p = ip.parse(data, quoted=quoted)
        if p is not None:
            repr(p)
            p.checksums_ok()
            _ = (p.is_icmp_error, p.is_icmp_echo, p.payload, p.tcp_flags, p.icmp_id)
            p.icmp_quoted()
    ip.parse_p2p_control(data)
    ip.prohibited_quoted_dst(data)
    ip.icmp_prohibited(data)
    ip.icmp_host_unreachable(data)


@settings(max_examples=300)
@given(packets(), st.data())
def test_mutated_packets_never_raise(raw: bytes, data: st.DataObject) -> None:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    b = b[: data.draw(st.integers(0, len(b)))]
    test_garbage_never_raises.hypothesis.inner_test(bytes(b))  # type: ignore[attr-defined]


# --- ICMP errors ---------------------------------------------------------------------------------
def test_prohibited_v4_quotes_original_and_comes_from_its_destination() -> None:
    err = ip.icmp_prohibited(KERNEL_UDP4)
    assert err is not None
    p = ip.parse(err)
    assert p is not None and p.checksums_ok()
    assert (p.src_ip, p.dst_ip) == ("10.99.0.2", "10.99.0.1")
    assert (p.icmp_type, p.icmp_code) == (3, 13)
    assert p.payload == KERNEL_UDP4
    q = p.icmp_quoted()
    assert q is not None and q.dport == 5353
    assert ip.prohibited_quoted_dst(err) == (4, int(ipaddress.IPv4Address("10.99.0.2")))


def test_prohibited_v6_is_code_1() -> None:
    err = ip.icmp_prohibited(KERNEL_UDP6)
    assert err is not None
    p = ip.parse(err)
    assert p is not None and p.checksums_ok() and p.proto == ip.PROTO_ICMPV6
    assert (p.icmp_type, p.icmp_code) == (1, 1)
    assert p.payload == KERNEL_UDP6
    assert ip.prohibited_quoted_dst(err) == (6, int(ipaddress.IPv6Address("fd99::2")))


def test_host_unreachable_codes() -> None:
    e4 = ip.parse(ip.icmp_host_unreachable(KERNEL_TCP4_SYN) or b"")
    e6 = ip.parse(ip.icmp_host_unreachable(KERNEL_UDP6) or b"")
    assert e4 is not None and (e4.icmp_type, e4.icmp_code) == (3, 1)
    assert e6 is not None and (e6.icmp_type, e6.icmp_code) == (1, 3)
    assert ip.prohibited_quoted_dst(e4.tobytes()) is None


@pytest.mark.parametrize(
    ("src", "dst", "limit"), [("10.0.0.1", "10.0.0.2", 576), ("fd00::1", "fd00::2", 1280)]
)
def test_error_quote_is_truncated_to_the_rfc_limit(src: str, dst: str, limit: int) -> None:
    big = ip.build_udp(src, dst, 1, 2, b"z" * 1400)
    err = ip.icmp_prohibited(big)
    assert err is not None and len(err) == limit
    p = ip.parse(err)
    assert p is not None and p.checksums_ok() and big.startswith(p.payload)


def test_no_error_about_an_error_or_from_unspecified_sources() -> None:
    err = ip.icmp_prohibited(KERNEL_UDP4)
    assert err is not None
    assert ip.icmp_prohibited(err) is None
    assert ip.icmp_prohibited(ip.build_udp("0.0.0.0", "10.0.0.1", 1, 2)) is None
    assert ip.icmp_prohibited(ip.build_udp("224.0.0.1", "10.0.0.1", 1, 2)) is None
    assert ip.icmp_prohibited(ip.build_udp("::", "fd00::1", 1, 2)) is None


# --- p2p control ---------------------------------------------------------------------------------
def test_p2p_control_round_trip_and_layout() -> None:
    raw = ip.build_p2p_control(ip.P2P_DOMAIN_STATUS, b'{"status":"active"}')
    assert raw[0] >> 4 == 6 and raw[6] == 0xFF and raw[8:40] == bytes(32)
    assert raw[40] == ip.P2P_DOMAIN_STATUS and raw[41:48] == bytes(7)
    assert ip.parse_p2p_control(raw) == (1, b'{"status":"active"}')


def test_p2p_control_rejects_other_packets() -> None:
    assert ip.parse_p2p_control(KERNEL_UDP6) is None
    assert ip.parse_p2p_control(KERNEL_UDP4) is None
    raw = bytearray(ip.build_p2p_control(0, b"{}"))
    raw[23] = 1  # source is no longer ::
    assert ip.parse_p2p_control(raw) is None
    short = ip.build_ip(bytes(16), bytes(16), 0xFF, b"\x00\x01")
    assert ip.parse_p2p_control(short) is None


@pytest.mark.parametrize("text,want", [
    ("192.0.2.1", ("192.0.2.1", 53)),
    (" 192.0.2.1:5353 ", ("192.0.2.1", 5353)),
    ("2001:DB8::1", ("2001:db8::1", 53)),
    ("[2001:db8::1]", ("2001:db8::1", 53)),
    ("[2001:db8::1]:853", ("2001:db8::1", 853)),
])
def test_parse_hostport(text: str, want: tuple[str, int]) -> None:
    assert ip.parse_hostport(text) == want


@pytest.mark.parametrize("bad", ["", "dns.example", "192.0.2.1:", "192.0.2.1:0", "192.0.2.1:65536", "[2001:db8::1]x",
                                 "[2001:db8::1", "192.0.2.1:53:53", "[192.0.2.1]:x"])
def test_parse_hostport_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        ip.parse_hostport(bad)
