"""wg-quick configuration parsing: the accepted format and the exact error messages."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from firezone import wgconf
from firezone.wgconf import WgConfigError

K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(1, 33))).decode()
K3 = base64.b64encode(b"\x07" * 32).decode()

GOOD = f"""\
# a comment line
[Interface]
PrivateKey = {K1}
ListenPort = 51820   # trailing comment
Address = 100.64.0.1/24, fd00:2021:1111::1/64
MTU = 1380
DNS = 100.100.111.1
PostUp = echo up

[Peer]
PublicKey = {K2}
PresharedKey = {K3}
Endpoint = 192.0.2.2:51821
AllowedIPs = 100.64.0.2/32, 198.51.100.0/24
AllowedIPs = fd00:2021:1111::2/128
PersistentKeepalive = 25

[peer]
publickey = {K3}
endpoint = [2001:db8::1]:443
"""


def test_parses_interface_and_peers() -> None:
    cfg = wgconf.parse(GOOD)
    assert cfg.private_key == bytes(range(32))
    assert cfg.listen_port == 51820
    assert cfg.addresses == [
        ipaddress.ip_interface("100.64.0.1/24"),
        ipaddress.ip_interface("fd00:2021:1111::1/64"),
    ]
    assert cfg.mtu == 1380
    assert cfg.dns == ["100.100.111.1"]
    assert cfg.ignored == [(8, "PostUp")]
    p1, p2 = cfg.peers
    assert p1.public_key == bytes(range(1, 33))
    assert p1.preshared_key == b"\x07" * 32
    assert p1.endpoint == ("192.0.2.2", 51821)
    assert [str(n) for n in p1.allowed_ips] == [
        "100.64.0.2/32",
        "198.51.100.0/24",
        "fd00:2021:1111::2/128",
    ]
    assert p1.persistent_keepalive == 25
    assert p1.line == 10
    assert p2.endpoint == ("2001:db8::1", 443)
    assert p2.allowed_ips == [] and p2.preshared_key is None and p2.persistent_keepalive is None


def test_minimal_config_has_defaults() -> None:
    cfg = wgconf.parse(f"[Interface]\nPrivateKey={K1}\n")
    assert cfg.listen_port is None and cfg.mtu is None and cfg.addresses == [] and cfg.peers == []


def test_keepalive_off_and_zero_mean_none() -> None:
    for v in ("off", "0"):
        cfg = wgconf.parse(
            f"[Interface]\nPrivateKey={K1}\n[Peer]\nPublicKey={K2}\nPersistentKeepalive={v}\n"
        )
        assert cfg.peers[0].persistent_keepalive is None


def test_hostname_endpoint_is_kept_for_the_runtime_to_resolve() -> None:
    cfg = wgconf.parse(
        f"[Interface]\nPrivateKey={K1}\n[Peer]\nPublicKey={K2}\nEndpoint=vpn.example.test:51820\n"
    )
    assert cfg.peers[0].endpoint == ("vpn.example.test", 51820)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"[Interface]\nPrivateKey = {K1}\nListenPort = 70000\n",
            "line 3: key 'ListenPort': port 70000 is not in 0..65535",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\nListenPort = abc\n",
            "line 3: key 'ListenPort': 'abc' is not a number",
        ),
        (
            "[Interface]\nPrivateKey = notakey\n",
            "line 2: key 'PrivateKey': not a WireGuard key (expected 44 base64 characters ending in '=')",
        ),
        (
            f"[Interface]\nPrivateKey = {K1[:-3]}!!=\n",
            "line 2: key 'PrivateKey': not a WireGuard key (invalid base64)",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n\n[Peer]\nPublicKey = {K2}\nAllowedIPs = 10.0.0.0/33\n",
            "line 6: key 'AllowedIPs': '10.0.0.0/33' is not an IP network",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nAllowedIPs = 10.0.0.0/8,,\n",
            "line 5: key 'AllowedIPs': empty item in a comma-separated list",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nEndpoint = 192.0.2.1\n",
            "line 5: key 'Endpoint': '192.0.2.1' is not host:port",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nEndpoint = 2001:db8::1:51820\n",
            "line 5: key 'Endpoint': '2001:db8::1:51820': write an IPv6 endpoint as [addr]:port",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nEndpoint = host:0\n",
            "line 5: key 'Endpoint': port '0' is not in 1..65535",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\nAddress = 10.0.0.300/24\n",
            "line 3: key 'Address': '10.0.0.300/24' is not an IP address with optional /prefix",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\nMTU = 100\n",
            "line 3: key 'MTU': MTU 100 is not in 576..65535",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\nColour = blue\n",
            "line 3: key 'Colour': unknown key in [Interface]",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nEndpont = 192.0.2.1:1\n",
            "line 5: key 'Endpont': unknown key in [Peer]",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\nPrivateKey = {K2}\n",
            "line 3: key 'PrivateKey': given twice in the same section",
        ),
        (
            f"PrivateKey = {K1}\n",
            "line 1: key 'PrivateKey': key outside of any [Interface] or [Peer] section",
        ),
        (
            f"[Interface]\nPrivateKey {K1}\n",
            f"line 2: expected 'Key = Value', got 'PrivateKey {K1}'",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peers]\n",
            "line 3: unknown section [Peers] (expected [Interface] or [Peer])",
        ),
        (f"[Interface\nPrivateKey = {K1}\n", "line 1: malformed section header '[Interface'"),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Interface]\n",
            "line 3: second [Interface] section (first on line 1)",
        ),
        (
            "[Interface]\nListenPort = 1\n",
            "line 1: key 'PrivateKey': [Interface] has no PrivateKey",
        ),
        (f"[Peer]\nPublicKey = {K2}\n", "no [Interface] section"),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nEndpoint = 192.0.2.1:1\n",
            "line 3: key 'PublicKey': [Peer] has no PublicKey",
        ),
        (
            f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\n[Peer]\nPublicKey = {K2}\n",
            "line 6: key 'PublicKey': the same peer is already defined on line 4",
        ),
    ],
)
def test_errors_name_line_and_key(text: str, message: str) -> None:
    with pytest.raises(WgConfigError) as ei:
        wgconf.parse(text)
    assert str(ei.value) == message


def test_error_carries_source_line_and_key_fields() -> None:
    with pytest.raises(WgConfigError) as ei:
        wgconf.parse(f"[Interface]\nPrivateKey = {K1}\nMTU = x\n", source="wg0.conf")
    assert str(ei.value) == "wg0.conf: line 3: key 'MTU': 'x' is not a number"
    assert (ei.value.line, ei.value.key) == (3, "MTU")


def test_key_codec_roundtrip_and_rejects() -> None:
    raw = bytes(range(32))
    assert wgconf.decode_key(wgconf.encode_key(raw) + "\n") == raw
    with pytest.raises(ValueError):
        wgconf.decode_key(base64.b64encode(b"\x00" * 31).decode() + "==")
    with pytest.raises(ValueError):
        wgconf.encode_key(b"short")


def test_parse_endpoint_ipv6_with_zone() -> None:
    assert wgconf.parse_endpoint("[fe80::1%eth0]:51820") == ("fe80::1%eth0", 51820)
