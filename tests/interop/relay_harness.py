"""Processes for relay interop tests and the relay benchmark: fz relay, coturn, uclient, peer.

Everything listens on loopback only; every process is started here and ended by its PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FZ = str(REPO / ".venv" / "bin" / "fz")
if not os.path.exists(FZ):  # an installed fz on PATH (e.g. CI with a different venv)
    FZ = shutil.which("fz") or FZ


def need(tool: str) -> str:
    """The path of a required executable; fail loudly when it is missing."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: install Debian package coturn")
    return path


def free_udp_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_block(size: int = 200) -> tuple[int, int]:
    """A port range likely free of others' ephemeral ports (keyed on our PID)."""
    base = 20000 + (os.getpid() * 7919) % 10000
    base -= base % size
    return base, base + size - 1


class Proc:
    """A child process with its output collected in a file; ended by PID."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.p = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)
        self.pid = self.p.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """utime + stime of the process (and its reaped children) from /proc."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        if self.p.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait(5)
        self._log.close()
        return self.p.returncode


def wait_udp_stun(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a STUN Binding request on host:port is answered."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    req = bytes.fromhex("000100002112a442") + os.urandom(12)
    deadline = time.monotonic() + timeout
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                s.sendto(req, (host, port))
                data = s.recv(2048)
                if data[:2] == b"\x01\x01" and data[8:20] == req[8:20]:
                    return
            except OSError:
                time.sleep(0.1)
    raise TimeoutError(f"no STUN answer from {host}:{port} within {timeout} s")


# ---------------------------------------------------------------------------- fz relay


def fz_relay(workdir: Path, *, listen: list[str], relay_ports: tuple[int, int],
             health: str | None = None, extra: list[str] | None = None,
             name: str = "fz-relay") -> tuple[Proc, Path]:
    secret_file = workdir / "relay.secret"
    argv = [FZ, "relay", "run", "--secret-file", str(secret_file),
            "--relay-ports", f"{relay_ports[0]}-{relay_ports[1]}", "--allow-loopback-peers",
            "--max-allocations-per-user", "1000"]
    for addr in listen:
        argv += ["--listen", addr]
    if health:
        argv += ["--health-listen", health]
    argv += extra or []
    return Proc(name, argv, workdir), secret_file


def fz_credentials(secret_file: Path, ttl: int = 3600) -> tuple[str, str]:
    key = "dGVzdC1rZXktMDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="  # 32 bytes, any valid key works
    out = subprocess.run([FZ, "relay", "credentials", "--secret-file", str(secret_file),
                          "--public-key", key, "--ttl", str(ttl), "--json"],
                         capture_output=True, text=True, timeout=30, check=True)
    data = json.loads(out.stdout)
    return data["username"], data["password"]


def wait_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- coturn


def coturn(workdir: Path, *, port: int, relay_ports: tuple[int, int], user: str, password: str,
           listen_ip: str = "127.0.0.1", extra: list[str] | None = None) -> Proc:
    conf = workdir / "turnserver.conf"
    lines = [
        f"listening-ip={listen_ip}", f"listening-port={port}", f"min-port={relay_ports[0]}",
        f"max-port={relay_ports[1]}", "realm=firezone", f"user={user}:{password}",
        "lt-cred-mech", "fingerprint", "no-cli", "no-tls", "no-dtls", "allow-loopback-peers",
        "no-multicast-peers", f"userdb={workdir / 'turndb'}", f"pidfile={workdir / 'turn.pid'}",
        "log-file=stdout", "simple-log",
    ]
    conf.write_text("\n".join(line for line in lines if line) + "\n")
    return Proc("turnserver", [need("turnserver"), "-c", str(conf), "--no-cli",
                               "--listening-ip", listen_ip, *(extra or [])], workdir)


def turn_peer(workdir: Path, host: str, port: int, name: str = "turnutils_peer") -> Proc:
    return Proc(name, [need("turnutils_peer"), "-L", host, "-p", str(port)], workdir)


# ---------------------------------------------------------------------------- uclient

_PROGRESS = re.compile(r"start_mclient: msz=\d+, tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
_LOST = re.compile(r"Total lost packets (\d+) \(([\d.]+)%\), total send dropped (\d+) \(([\d.]+)%\)")
_TOTALS = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")


@dataclass
class UclientResult:
    returncode: int
    output: str
    progress: list[tuple[float, int, int]] = field(default_factory=list)  # (t, sent, received)
    sent: int | None = None
    received: int | None = None
    lost: int | None = None
    lost_pct: float | None = None
    send_dropped: int | None = None

    def best_window(self, seconds: float = 5.0) -> tuple[float, float, float] | None:
        """Best rate of received messages over a window of at least ``seconds``.

        Returns (received per second, window start, window end) using our own timestamps of
        uclient's per-second progress lines.
        """
        best: tuple[float, float, float] | None = None
        pts = self.progress
        j = 0
        for i in range(len(pts)):
            while j < len(pts) and pts[j][0] - pts[i][0] < seconds - 0.05:
                j += 1
            if j >= len(pts):
                break
            dt = pts[j][0] - pts[i][0]
            rate = (pts[j][2] - pts[i][2]) / dt
            if best is None or rate > best[0]:
                best = (rate, pts[i][0], pts[j][0])
        return best


def uclient(args: list[str], server: str, timeout: float = 120.0,
            on_line: Callable[[float, str, int], None] | None = None) -> UclientResult:
    """Run turnutils_uclient, timestamping each output line as it arrives.

    ``on_line(t, line, pid)`` is called for every line (pid: uclient's).
    """
    argv = [need("turnutils_uclient"), *args, server]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, bufsize=1)
    lines: list[str] = []
    progress: list[tuple[float, int, int]] = []
    timer = threading.Timer(timeout, lambda: p.poll() is None and os.kill(p.pid, signal.SIGKILL))
    timer.start()
    t0 = time.monotonic()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            now = time.monotonic() - t0
            lines.append(line)
            m = _PROGRESS.search(line)
            if m:
                progress.append((now, int(m.group(1)), int(m.group(2))))
            if on_line is not None:
                on_line(now, line, p.pid)
        p.wait()
    finally:
        timer.cancel()
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    out = "".join(lines)
    res = UclientResult(returncode=p.returncode, output=out, progress=progress)
    if (m := _TOTALS.search(out)):
        res.sent, res.received = int(m.group(1)), int(m.group(2))
    if (m := _LOST.search(out)):
        res.lost, res.lost_pct, res.send_dropped = int(m.group(1)), float(m.group(2)), int(m.group(3))
    return res


def tmpdir(prefix: str = "fzrelay") -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def python() -> str:
    return sys.executable


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open."""
    out: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def udp_drops_by_inode() -> dict[str, int]:
    """The kernel's per-socket UDP receive drops (last column of /proc/net/udp{,6})."""
    out: dict[str, int] = {}
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                out[parts[9]] = int(parts[-1])
    return out
