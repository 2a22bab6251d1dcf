"""Full-tunnel routing for the Internet resource, with fz's own traffic kept outside.

While the Internet resource is on, the default routes through the TUN (``0.0.0.0/0``, ``::/0``)
live in a routing table of their own (:data:`TABLE`), and one rule per family sends every packet
*without* fz's firewall mark (:data:`MARK`) to that table. The client marks its own sockets
(:func:`mark_socket`: UDP to gateways and relays, the portal WebSocket, DNS forwarded to the
upstream resolvers), so those keep using the main table and never loop into the tunnel they
carry; everything else on the machine goes through the tunnel. Rules and table are removed when
the resource is turned off or the client exits, and :func:`disable` at start-up clears what a
crashed run left behind.
"""

from __future__ import annotations

import logging
import socket
import subprocess

log = logging.getLogger(__name__)

# fwmark and table id ("2021 fd00", as the tunnel ranges); the rule sits well before main (32766).
MARK = 0x2021FD00
TABLE = 0x2021FD00
RULE_PRIORITY = 20210
SO_MARK = getattr(socket, "SO_MARK", 36)


class FullTunnelError(RuntimeError):
    """An ``ip`` command failed; the message is the command's own."""


def mark_socket(sock: socket.socket) -> bool:
    """Give ``sock`` fz's mark so its packets bypass the tunnel (needs CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    except OSError as e:
        log.debug("cannot mark socket", extra={"error": str(e)})
        return False
    return True


def marked_socket(family: int, type_: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    mark_socket(sock)
    return sock


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if check and r.returncode != 0:
        raise FullTunnelError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def enable(tun: str, *, ipv6: bool = True) -> None:
    """Route everything unmarked through ``tun``."""
    disable()
    for fam, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        if fam == "-6" and not ipv6:
            continue
        _ip(fam, "route", "replace", default, "dev", tun, "table", str(TABLE))
        _ip(fam, "rule", "add", "not", "fwmark", hex(MARK), "table", str(TABLE), "priority", str(RULE_PRIORITY))
    log.debug("full tunnel on", extra={"interface": tun})


def disable() -> bool:
    """Remove the rules and the table's routes; whether anything was there."""
    found = False
    for fam in ("-4", "-6"):
        for _ in range(8):  # one rule per run; more only if something added duplicates
            if _ip(fam, "rule", "del", "priority", str(RULE_PRIORITY), check=False).returncode != 0:
                break
            found = True
        _ip(fam, "route", "flush", "table", str(TABLE), check=False)
    return found


def active() -> bool:
    return str(RULE_PRIORITY) in _ip("-4", "rule", "show", "priority", str(RULE_PRIORITY), check=False).stdout
