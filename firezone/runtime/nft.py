"""nftables for the gateway: render one ruleset for our own ``table inet firezone``, apply it
atomically with ``nft -f -``, remove it on exit.

The table masquerades what leaves the host from the tunnel ranges (the resources answer the
gateway's own address, as Firezone's gateway does with iptables MASQUERADE) and nothing else;
rules of other tables are never touched.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)

TABLE = "firezone"
# firezone-notes §1.2: the tunnel ranges the gateway masquerades.
TUNNEL_V4 = "100.64.0.0/11"
TUNNEL_V6 = "fd00:2021:1111::/107"


class NftError(RuntimeError):
    """``nft`` is missing or refused the ruleset; the message carries its stderr."""


def render(tun: str, *, ipv4: bool = True, ipv6: bool = True, table: str = TABLE) -> str:
    """The ruleset text: (re)create ``table inet <table>`` with one masquerading postrouting chain."""
    rules: list[str] = []
    if ipv4:
        rules.append(f'ip saddr {TUNNEL_V4} oifname != "{tun}" masquerade')
    if ipv6:
        rules.append(f'ip6 saddr {TUNNEL_V6} oifname != "{tun}" masquerade')
    body = "\n".join(f"    {r}" for r in rules)
    # "add table" then "delete table" makes the delete safe when the table does not exist yet.
    return (f"add table inet {table}\n"
            f"delete table inet {table}\n"
            f"table inet {table} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"{body}\n"
            f"  }}\n"
            f"}}\n")


def _nft(args: Sequence[str], text: str | None = None) -> None:
    exe = shutil.which("nft")
    if exe is None:
        raise NftError("nft not found: install the nftables package")
    p = subprocess.run([exe, *args], input=text, capture_output=True, text=True, timeout=15, check=False)
    if p.returncode != 0:
        raise NftError(f"nft {' '.join(args)} failed: {p.stderr.strip()}")


def apply(ruleset: str) -> None:
    """Load ``ruleset`` atomically (``nft -f -``)."""
    _nft(["-f", "-"], ruleset)
    log.debug("nftables ruleset applied", extra={"table": TABLE})


def remove(table: str = TABLE) -> None:
    """Delete our table (no error if it is already gone)."""
    _nft(["-f", "-"], f"add table inet {table}\ndelete table inet {table}\n")
    log.debug("nftables table removed", extra={"table": table})
