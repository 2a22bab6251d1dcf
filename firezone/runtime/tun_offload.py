"""TCP receive coalescing for TUN writes (the TUN half of GRO), as pure functions.

With ``IFF_VNET_HDR`` every TUN read and write carries a 10-byte virtio-net header. Writing one
header that says "TCPv4 GSO, segment size N, checksum partial" lets us hand the kernel a run of
consecutive segments of one TCP flow as a single packet of up to 64 KiB: one ``write`` and one
pass through the kernel's TCP receive path instead of one per segment. This is what Linux GRO does
on a NIC; the rules for which segments may merge follow ``tcp_gro_receive`` (same flow, next
sequence number, same ACK, flags, window and options, equal sizes with only the last one shorter).

The merged packet's TCP checksum field holds the pseudo-header sum only (CHECKSUM_PARTIAL): the
kernel treats the payload as already verified, which holds here because every segment came out
of an authenticated WireGuard session. Reads on such a TUN return plain packets behind an
all-zero header as long as no TUNSETOFFLOAD is issued.
"""

from __future__ import annotations

import struct

VNET_HDR_LEN = 10
# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
# (little-endian on the hosts we run on; TUN uses the host's byte order by default)
VNET_HDR = struct.Struct("<BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
NO_OFFLOAD = bytes(VNET_HDR_LEN)

_TCP_ACK = 0x10
_TCP_PSH = 0x08
_MAX_IP_LEN = 65535
_IP_WORDS = struct.Struct("!10H")


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4_header_checksum(header: bytes | bytearray) -> int:
    """RFC 791 header checksum of a 20-byte header whose checksum field is zero."""
    return ~_fold(sum(_IP_WORDS.unpack(header))) & 0xFFFF


def _mergeable(p: bytes) -> int:
    """Header length (IP + TCP) if ``p`` is an IPv4 TCP data segment that may be merged, else 0."""
    if len(p) < 40 or p[0] != 0x45 or p[9] != 6 or (p[6] & 0x3F) or p[7]:
        return 0  # not IPv4 without options, not TCP, or a fragment
    if p[33] & 0x3F not in (_TCP_ACK, _TCP_ACK | _TCP_PSH):
        return 0  # SYN, FIN, RST or URG: always alone
    hl = 20 + (p[32] >> 4) * 4
    if len(p) <= hl or int.from_bytes(p[2:4], "big") != len(p):
        return 0
    return hl


def coalesce(packets: list[bytes]) -> list[bytes]:
    """Turn decrypted IP packets into TUN writes (each with a virtio-net header), merging runs of
    consecutive segments of the same TCP/IPv4 flow. Order is kept; nothing is dropped."""
    out: list[bytes] = []
    n = len(packets)
    i = 0
    while i < n:
        p = packets[i]
        hl = _mergeable(p)
        if not hl:
            out.append(NO_OFFLOAD + p)
            i += 1
            continue
        size = len(p) - hl
        seq = int.from_bytes(p[24:28], "big")
        nxt = (seq + size) & 0xFFFFFFFF
        total = len(p)
        # bytes that must be equal in every merged segment: addresses and ports, ACK, and the
        # TCP options; then data offset, flags-without-PSH and window
        flow = p[12:24]
        ack = p[28:32]
        opts = p[40:hl]
        dw = p[32:36]
        j = i + 1
        psh = p[33] & _TCP_PSH
        last_short = False
        while j < n and not psh and not last_short:
            q = packets[j]
            qsize = len(q) - hl
            if (
                qsize <= 0
                or qsize > size
                or total + qsize > _MAX_IP_LEN
                or _mergeable(q) != hl
                or q[12:24] != flow
                or q[28:32] != ack
                or int.from_bytes(q[24:28], "big") != nxt
                or q[1] != p[1]
                or q[8] != p[8]
                or q[32] != dw[0]
                or q[34:36] != dw[2:4]
                or q[40:hl] != opts
            ):
                break
            psh = q[33] & _TCP_PSH
            last_short = qsize < size
            nxt = (nxt + qsize) & 0xFFFFFFFF
            total += qsize
            j += 1
        if j == i + 1:
            out.append(NO_OFFLOAD + p)
            i += 1
            continue
        ip = bytearray(p[:20])
        ip[2:4] = total.to_bytes(2, "big")
        ip[10:12] = b"\x00\x00"
        ip[10:12] = ipv4_header_checksum(ip).to_bytes(2, "big")
        tcp = bytearray(p[20:hl])
        if psh:
            tcp[13] |= _TCP_PSH
        # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not its complement
        src_dst = _IP_WORDS.unpack(bytes(p[:20]))[6:10]
        tcp[16:18] = _fold(sum(src_dst) + 6 + total - 20).to_bytes(2, "big")
        hdr = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hl, size, 20, 16)
        out.append(b"".join([hdr, ip, tcp, *(packets[k][hl:] for k in range(i, j))]))
        i = j
    return out
