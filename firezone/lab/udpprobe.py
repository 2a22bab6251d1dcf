"""Small UDP tools for checking the lab's NAT and loss (``python -m firezone.lab.udpprobe``).

- ``echo --port P``: answer every datagram with the sender's address and port as seen here
  (after any NAT), one JSON object per reply;
- ``probe --to HOST:PORT --to HOST:PORT [--bind-port P]``: from ONE socket, ask each echo server how it sees us;
  prints ``{"HOST:PORT": "ip port", ...}``. Same port at two destinations = endpoint-independent
  mapping; different ports = address/port-dependent ("symmetric") mapping;
- ``count --port P --idle S``: count datagrams until ``S`` seconds pass without one; prints
  ``{"received": N}``;
- ``blast --to HOST:PORT --count N``: send N numbered datagrams one way;
- ``punch --bind-port P --peer HOST:PORT``: UDP hole punching: send to the peer's expected
  public address every ``--interval`` for ``--duration`` seconds; prints how many datagrams
  came back and from where.

Servers print ``ready`` on stdout once bound, so a caller can wait for that line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time


def _parse_target(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def _plain(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _dual_stack(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::", port))
    return s


def echo(port: int) -> None:
    s = _dual_stack(port)
    print("ready", flush=True)
    while True:
        _, src = s.recvfrom(2048)
        s.sendto(json.dumps({"ip": _plain(src[0]), "port": src[1]}).encode(), src)


def count(port: int, idle: float, max_wait: float) -> None:
    s = _dual_stack(port)
    print("ready", flush=True)
    n = 0
    s.settimeout(max_wait)
    try:
        while True:
            s.recv(2048)
            n += 1
            s.settimeout(idle)
    except TimeoutError:
        pass
    print(json.dumps({"received": n}), flush=True)


def probe(targets: list[str], timeout: float, tries: int, bind_port: int = 0) -> None:
    fam = socket.AF_INET6 if any(":" in _parse_target(t)[0] for t in targets) else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", bind_port))
    s.settimeout(timeout)
    seen: dict[str, str] = {}
    for t in targets:
        dest = _parse_target(t)
        for _ in range(tries):
            s.sendto(b"probe", dest)
            try:
                data, _src = s.recvfrom(2048)
            except TimeoutError:
                continue
            reply = json.loads(data)
            seen[t] = f"{reply['ip']} {reply['port']}"
            break
    print(json.dumps({"local_port": s.getsockname()[1], "seen": seen}), flush=True)
    if len(seen) != len(targets):
        sys.exit(1)


def blast(target: str, n: int, interval: float) -> None:
    dest = _parse_target(target)
    s = socket.socket(socket.AF_INET6 if ":" in dest[0] else socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        s.sendto(i.to_bytes(4, "big") + bytes(60), dest)
        if interval:
            time.sleep(interval)
    print(json.dumps({"sent": n}), flush=True)


def punch(bind_port: int, peer: str, duration: float, interval: float) -> None:
    dest = _parse_target(peer)
    fam = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", bind_port))
    print("ready", flush=True)
    got = 0
    sources: set[str] = set()
    end = time.monotonic() + duration
    while time.monotonic() < end:
        s.sendto(b"punch", dest)
        s.settimeout(interval)
        try:
            while True:
                _, src = s.recvfrom(2048)
                got += 1
                sources.add(f"{_plain(src[0])} {src[1]}")
        except TimeoutError:
            pass
        except OSError:  # an ICMP error reported on the socket
            time.sleep(interval)
    print(json.dumps({"received": got, "from": sorted(sources)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m firezone.lab.udpprobe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    c = sub.add_parser("count")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--idle", type=float, default=1.0)
    c.add_argument("--max-wait", type=float, default=30.0)
    p = sub.add_parser("probe")
    p.add_argument("--to", action="append", required=True, metavar="HOST:PORT")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--bind-port", type=int, default=0, help="local port (default: any)")
    b = sub.add_parser("blast")
    b.add_argument("--to", required=True, metavar="HOST:PORT")
    b.add_argument("--count", type=int, default=1000)
    b.add_argument("--interval", type=float, default=0.0002)
    h = sub.add_parser("punch")
    h.add_argument("--bind-port", type=int, required=True)
    h.add_argument("--peer", required=True, metavar="HOST:PORT")
    h.add_argument("--duration", type=float, default=3.0)
    h.add_argument("--interval", type=float, default=0.1)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "echo":
            echo(a.port)
        elif a.cmd == "count":
            count(a.port, a.idle, a.max_wait)
        elif a.cmd == "probe":
            probe(a.to, a.timeout, a.tries, a.bind_port)
        elif a.cmd == "punch":
            punch(a.bind_port, a.peer, a.duration, a.interval)
        else:
            blast(a.to, a.count, a.interval)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
