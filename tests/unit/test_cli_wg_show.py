"""`fz wg show` rendering (the text mirrors `wg show`)."""

from __future__ import annotations

import time

from firezone.cli.wg import _ago, _bytes, _info_dict, _render
from firezone.runtime.wg_uapi import InterfaceInfo, PeerInfo


def test_ago_and_bytes_read_like_wg() -> None:
    assert _ago(None, 100.0) == "never"
    assert _ago(100.0, 100.4) == "Now"
    assert _ago(100.0, 101.0) == "1 second ago"
    assert _ago(0.5, 3725.5) == "1 hour, 2 minutes, 5 seconds ago"
    assert _bytes(512) == "512 B" and _bytes(1536) == "1.50 KiB" and _bytes(3 << 30) == "3.00 GiB"


def test_render_shows_peers_without_secrets() -> None:
    priv = bytes(range(32))
    info = InterfaceInfo(private_key=priv, public_key=None, listen_port=51820, peers=[
        PeerInfo(public_key=b"\x02" * 32, preshared_key=b"\x03" * 32, endpoint=("192.0.2.2", 51821),
                 last_handshake_unix=time.time() - 5, rx_bytes=2048, tx_bytes=100,
                 persistent_keepalive=25, allowed_ips=["100.64.0.2/32"]),
    ])
    d = _info_dict("wg0", info)
    assert d["peers"][0]["preshared_key"] is True
    text = _render(d)
    assert text.startswith("interface: wg0\n  public key: ")
    assert "  private key: (hidden)\n  listening port: 51820\n" in text
    assert "peer: AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n  preshared key: (hidden)\n" in text
    assert "  endpoint: 192.0.2.2:51821\n  allowed ips: 100.64.0.2/32\n" in text
    assert "  latest handshake: 5 seconds ago\n" in text or "  latest handshake: 4 seconds ago\n" in text
    assert "  transfer: 2.00 KiB received, 100 B sent\n  persistent keepalive: every 25 seconds" in text
    assert "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" not in text  # the private key
