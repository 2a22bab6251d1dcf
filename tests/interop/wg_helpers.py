"""Start WireGuard peers inside test namespaces: Debian's wireguard-go (+ wg) and ``fz wg up``.

Shared by tests/interop/test_wg_interop.py and bench/wg_throughput/run.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from tests.interop.netns import Netns, run, wait_until

WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
WG_SOCK_DIR = Path("/var/run/wireguard")
FZ_RUN_DIR = Path("/run/firezone/wg")


def keypair() -> tuple[str, str]:
    """(private, public) in base64, made by the real ``wg`` tool."""
    priv = run(["wg", "genkey"]).stdout.strip()
    pub = run(["wg", "pubkey"], input=priv + "\n").stdout.strip()
    return priv, pub


def genpsk() -> str:
    return run(["wg", "genpsk"]).stdout.strip()


@dataclass
class PeerSpec:
    public_key: str
    allowed_ips: list[str]
    endpoint: str | None = None
    preshared_key: str | None = None
    keepalive: int | None = None


@dataclass
class Side:
    """One end of a tunnel: the namespace, its interface and how it was started."""

    ns: Netns
    ifname: str
    private_key: str
    public_key: str
    port: int
    tunnel_ip: str
    kind: str  # "fz" | "wggo"
    proc: subprocess.Popen[bytes] | None = None
    conf_path: Path | None = None
    peers: list[PeerSpec] = field(default_factory=list)


def conf_text(private_key: str, port: int | None, peers: list[PeerSpec], *,
              address: str | None = None, mtu: int | None = None) -> str:
    """A wg-quick file (``address``/``mtu`` given) or a ``wg setconf`` file (left out)."""
    lines = ["[Interface]", f"PrivateKey = {private_key}"]
    if port is not None:
        lines.append(f"ListenPort = {port}")
    if address:
        lines.append(f"Address = {address}")
    if mtu:
        lines.append(f"MTU = {mtu}")
    for p in peers:
        lines += ["", "[Peer]", f"PublicKey = {p.public_key}", f"AllowedIPs = {', '.join(p.allowed_ips)}"]
        if p.preshared_key:
            lines.append(f"PresharedKey = {p.preshared_key}")
        if p.endpoint:
            lines.append(f"Endpoint = {p.endpoint}")
        if p.keepalive:
            lines.append(f"PersistentKeepalive = {p.keepalive}")
    return "\n".join(lines) + "\n"


def start_wggo(side: Side, *, prefixlen: int = 24, mtu: int | None = None) -> None:
    """Run ``wireguard-go -f`` in the side's namespace and configure it with ``wg setconf``."""
    ns = side.ns
    side.proc = ns.popen(["wireguard-go", "-f", side.ifname], env=WG_ENV, log_name=side.ifname)
    sock = WG_SOCK_DIR / f"{side.ifname}.sock"
    wait_until(lambda: sock.exists() or side.proc.poll() is not None, 10, what=f"{sock}")
    if side.proc.poll() is not None:
        raise RuntimeError(f"wireguard-go exited {side.proc.returncode}: {ns.topo.log(side.ifname)}")
    path = ns.topo.log_dir / f"{side.ifname}.wg.conf"
    path.write_text(conf_text(side.private_key, side.port, side.peers))
    os.chmod(path, 0o600)
    side.conf_path = path
    ns.run(["wg", "setconf", side.ifname, str(path)])
    ns.run(["ip", "addr", "add", f"{side.tunnel_ip}/{prefixlen}", "dev", side.ifname])
    if mtu:
        ns.run(["ip", "link", "set", side.ifname, "mtu", str(mtu)])
    ns.run(["ip", "link", "set", side.ifname, "up"])


def fz_command() -> list[str]:
    return [sys.executable, "-m", "firezone"]


def start_fz(side: Side, *, prefixlen: int = 24, mtu: int | None = None, verbose: int = 0,
             extra_args: list[str] | None = None) -> None:
    """Run ``fz wg up`` in the side's namespace and wait until its control socket answers."""
    ns = side.ns
    path = ns.topo.log_dir / f"{side.ifname}.conf"
    path.write_text(conf_text(side.private_key, side.port, side.peers,
                              address=f"{side.tunnel_ip}/{prefixlen}", mtu=mtu))
    os.chmod(path, 0o600)
    side.conf_path = path
    args = fz_command() + (["-" + "v" * verbose] if verbose else []) + \
        ["wg", "up", str(path), "--name", side.ifname] + (extra_args or [])
    side.proc = ns.popen(args, log_name=side.ifname, cwd=str(Path(__file__).resolve().parents[2]))
    sock = FZ_RUN_DIR / f"{side.ifname}.sock"

    def ready() -> bool:
        if side.proc.poll() is not None:
            raise RuntimeError(f"fz wg up exited {side.proc.returncode}: {ns.topo.log(side.ifname)}")
        return sock.exists()

    wait_until(ready, 20, what=f"fz wg up control socket {sock}")


def wg_dump(ns: Netns, ifname: str) -> dict[str, dict[str, str | int]]:
    """``wg show IFACE dump`` per peer public key: endpoint, latest_handshake, rx, tx."""
    out = ns.run(["wg", "show", ifname, "dump"]).stdout.strip().splitlines()
    peers = {}
    for line in out[1:]:
        f = line.split("\t")
        peers[f[0]] = {"endpoint": f[2], "allowed_ips": f[3], "latest_handshake": int(f[4]),
                       "rx": int(f[5]), "tx": int(f[6])}
    return peers


def ping_until_up(ns: Netns, addr: str, timeout: float = 15) -> None:
    """Ping until one reply arrives (the first packets wait for the handshake)."""
    def once() -> bool:
        return ns.run(["ping", "-c", "1", "-W", "1", addr], check=False).returncode == 0
    wait_until(once, timeout, interval=0.1, what=f"a ping reply from {addr}")


SENDER = textwrap.dedent("""
    import socket, sys
    s = socket.create_server((sys.argv[1], int(sys.argv[2])))
    c, _ = s.accept()
    with open(sys.argv[3], "rb") as f:
        c.sendfile(f)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    c.close()
""")

RECEIVER = textwrap.dedent("""
    import hashlib, socket, sys, time
    for _ in range(100):
        try:
            c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b); n += len(b)
    c.close()
    print(n, h.hexdigest())
""")


def tcp_transfer(server_ns: Netns, client_ns: Netns, server_ip: str, blob: Path,
                 port: int = 5001, timeout: float = 120) -> tuple[int, str, str]:
    """Send ``blob`` over TCP from server_ns to client_ns; return (bytes, sha256 received, sha256 sent)."""
    srv = server_ns.popen([sys.executable, "-c", SENDER, server_ip, str(port), str(blob)],
                          log_name=f"sender{port}")
    try:
        out = client_ns.run([sys.executable, "-c", RECEIVER, server_ip, str(port)],
                            timeout=timeout).stdout.split()
    finally:
        server_ns.topo.stop(srv)
    return int(out[0]), out[1], hashlib.sha256(blob.read_bytes()).hexdigest()
