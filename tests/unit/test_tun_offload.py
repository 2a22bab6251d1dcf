"""TCP coalescing for TUN writes: which segments merge and what the merged packet looks like."""

from __future__ import annotations

import struct

from firezone.runtime.tun_offload import (
    NO_OFFLOAD,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    VNET_HDR_LEN,
    coalesce,
    ipv4_header_checksum,
)

SRC, DST = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
OPTS = bytes([1, 1, 8, 10]) + (1000).to_bytes(4, "big") + (2000).to_bytes(4, "big")  # NOP NOP TS


def tcp4(seq: int, payload: bytes, *, flags: int = 0x10, ack: int = 7, sport: int = 40000,
         opts: bytes = OPTS, window: int = 500, ttl: int = 64) -> bytes:
    thl = 20 + len(opts)
    total = 20 + thl + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, ttl, 6, 0, SRC, DST))
    ip[10:12] = ipv4_header_checksum(ip).to_bytes(2, "big")
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (thl // 4) << 4, flags, window, 0, 0) + opts
    return bytes(ip) + tcp + payload


def test_consecutive_segments_of_one_flow_merge() -> None:
    segs = [tcp4(1000 + 100 * k, bytes([k]) * 100) for k in range(4)] + [tcp4(1400, b"z" * 30, flags=0x18)]
    (out,) = coalesce(segs)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(out)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 52, 100, 20, 16)
    pkt = out[VNET_HDR_LEN:]
    assert len(pkt) == 52 + 430 and int.from_bytes(pkt[2:4], "big") == len(pkt)
    assert ipv4_header_checksum(pkt[:10] + b"\0\0" + pkt[12:20]) == int.from_bytes(pkt[10:12], "big")
    assert int.from_bytes(pkt[24:28], "big") == 1000 and pkt[33] == 0x18  # first seq, PSH kept
    assert pkt[52:] == b"".join(s[52:] for s in segs)
    # CHECKSUM_PARTIAL: the field is the folded pseudo-header sum (src, dst, proto, TCP length)
    words = sum(struct.unpack("!4H", SRC + DST)) + 6 + (len(pkt) - 20)
    while words > 0xFFFF:
        words = (words & 0xFFFF) + (words >> 16)
    assert int.from_bytes(pkt[36:38], "big") == words


def test_gaps_flow_changes_and_control_segments_break_runs() -> None:
    a = tcp4(0, b"a" * 100)
    gap = tcp4(300, b"b" * 100)
    other = tcp4(400, b"c" * 100, sport=1)
    syn = tcp4(500, b"", flags=0x02)
    fin = tcp4(0, b"d" * 100, flags=0x11)
    out = coalesce([a, gap, other, syn, fin])
    assert out == [NO_OFFLOAD + p for p in (a, gap, other, syn, fin)]


def test_header_differences_break_runs() -> None:
    base = tcp4(0, b"a" * 100)
    for variant in (tcp4(100, b"b" * 100, ack=8), tcp4(100, b"b" * 100, window=501),
                    tcp4(100, b"b" * 100, ttl=63),
                    tcp4(100, b"b" * 100, opts=OPTS[:4] + (1001).to_bytes(4, "big") + OPTS[8:]),
                    tcp4(100, b"b" * 101)):
        assert coalesce([base, variant]) == [NO_OFFLOAD + base, NO_OFFLOAD + variant]


def test_a_short_or_pushed_segment_ends_a_run() -> None:
    segs = [tcp4(0, b"a" * 100), tcp4(100, b"b" * 50), tcp4(150, b"c" * 100)]
    out = coalesce(segs)
    assert len(out) == 2 and VNET_HDR.unpack_from(out[0])[3] == 100
    assert out[1] == NO_OFFLOAD + segs[2]
    pushed = [tcp4(0, b"a" * 100, flags=0x18), tcp4(100, b"b" * 100)]
    assert coalesce(pushed) == [NO_OFFLOAD + p for p in pushed]


def test_size_limit_and_non_tcp_pass_through() -> None:
    segs = [tcp4(1400 * k, bytes([k % 256]) * 1400) for k in range(60)]
    out = coalesce(segs)
    assert all(len(o) - VNET_HDR_LEN <= 65535 for o in out) and len(out) == 2
    assert b"".join(o[VNET_HDR_LEN + 52:] for o in out) == b"".join(s[52:] for s in segs)
    udp = bytes([0x45, 0, 0, 28]) + bytes(5) + b"\x11" + bytes(18)
    v6 = bytes([0x60]) + bytes(39)
    assert coalesce([udp, v6]) == [NO_OFFLOAD + udp, NO_OFFLOAD + v6]
