"""The gateway's nftables ruleset text (firezone.runtime.nft.render)."""

from __future__ import annotations

from firezone.runtime import nft


def test_ruleset_replaces_only_our_table_atomically() -> None:
    text = nft.render("tun-firezone")
    lines = text.splitlines()
    # add+delete first: loading it twice, or when the table is missing, both work.
    assert lines[:2] == ["add table inet firezone", "delete table inet firezone"]
    assert "table inet firezone {" in lines
    assert all("firezone" in line for line in lines if line.startswith(("add", "delete", "table")))


def test_masquerades_both_tunnel_ranges_except_into_the_tun() -> None:
    text = nft.render("tun-x")
    assert "type nat hook postrouting priority srcnat; policy accept;" in text
    assert 'ip saddr 100.64.0.0/11 oifname != "tun-x" masquerade' in text
    assert 'ip6 saddr fd00:2021:1111::/107 oifname != "tun-x" masquerade' in text


def test_families_can_be_left_out() -> None:
    text = nft.render("tun-x", ipv6=False)
    assert "ip saddr 100.64.0.0/11" in text
    assert "ip6 saddr" not in text
