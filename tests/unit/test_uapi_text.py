"""The WireGuard UAPI ``get=1`` text that ``fz wg up`` serves and ``fz wg show`` reads."""

from __future__ import annotations

import pytest

from firezone.runtime.wg_uapi import InterfaceInfo, PeerInfo, format_endpoint, parse_get, render_get

# What wireguard-go 0.0.20220316 answers for one peer (shape copied from its IpcGetOperation).
WIREGUARD_GO_REPLY = (
    "private_key=" + "11" * 32 + "\n"
    "listen_port=51821\n"
    "public_key=" + "22" * 32 + "\n"
    "preshared_key=" + "00" * 32 + "\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.1:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=1234\n"
    "rx_bytes=5678\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=100.64.0.1/32\n"
    "errno=0\n\n"
)


def test_parses_wireguard_go_reply() -> None:
    info = parse_get(WIREGUARD_GO_REPLY)
    assert info.private_key == b"\x11" * 32 and info.listen_port == 51821
    (p,) = info.peers
    assert p.public_key == b"\x22" * 32
    assert p.preshared_key is None
    assert p.endpoint == ("192.0.2.1", 51820)
    assert p.last_handshake_unix == pytest.approx(1700000000.5)
    assert (p.tx_bytes, p.rx_bytes) == (1234, 5678)
    assert p.persistent_keepalive is None
    assert p.allowed_ips == ["100.64.0.1/32"]


def test_render_then_parse_roundtrips() -> None:
    info = InterfaceInfo(
        private_key=b"\x01" * 32,
        public_key=None,
        listen_port=51820,
        fwmark=7,
        peers=[
            PeerInfo(
                public_key=b"\x02" * 32,
                preshared_key=b"\x03" * 32,
                endpoint=("2001:db8::1", 443),
                last_handshake_unix=1700000001.25,
                rx_bytes=10,
                tx_bytes=20,
                persistent_keepalive=25,
                allowed_ips=["100.64.0.2/32", "fd00:2021:1111::2/128"],
            ),
            PeerInfo(public_key=b"\x04" * 32),
        ],
    )
    text = render_get(info)
    assert text.endswith("errno=0\n\n")
    assert "endpoint=[2001:db8::1]:443\n" in text
    back = parse_get(text)
    assert back.private_key == info.private_key and back.listen_port == 51820 and back.fwmark == 7
    p, q = back.peers
    assert p.preshared_key == b"\x03" * 32 and p.endpoint == ("2001:db8::1", 443)
    assert p.last_handshake_unix == pytest.approx(1700000001.25)
    assert (p.rx_bytes, p.tx_bytes, p.persistent_keepalive) == (10, 20, 25)
    assert p.allowed_ips == ["100.64.0.2/32", "fd00:2021:1111::2/128"]
    assert q.endpoint is None and q.last_handshake_unix is None and q.preshared_key is None


def test_error_reply_raises() -> None:
    with pytest.raises(ValueError, match="errno=1"):
        parse_get("errno=1\n\n")


def test_format_endpoint() -> None:
    assert format_endpoint(("192.0.2.1", 1)) == "192.0.2.1:1"
    assert format_endpoint(("::1", 2)) == "[::1]:2"
