"""Small helper for tests and benchmarks that need network namespaces joined by veth pairs.

Every namespace name starts with a per-run prefix (``fzt<pid>...``) so parallel runs never collide,
and :meth:`Topology.close` (called from a fixture finalizer or ``with`` exit, also on failure) stops
the processes started through it, by PID, and deletes the namespaces.

    with Topology("wg") as topo:
        a, b = topo.netns("a"), topo.netns("b")
        topo.veth(a, b, "192.0.2.1/24", "192.0.2.2/24")
        proc = b.popen(["iperf3", "-s"])
        a.run(["ping", "-c1", "192.0.2.2"])
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

_counter = itertools.count()


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in the root namespace; on failure raise with its stderr in the message."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


class Netns:
    """One network namespace; commands run inside it with ``ip netns exec``."""

    def __init__(self, topo: Topology, name: str) -> None:
        self.topo = topo
        self.name = name

    def cmd(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 30,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(args), check=check, timeout=timeout, **kw)

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kw)

    def popen(self, args: Sequence[str], *, log_name: str | None = None, env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace; output goes to a log file in the topology's
        directory (see :meth:`Topology.log`). It is stopped by :meth:`Topology.close`."""
        name = log_name or Path(args[0]).name
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with open(self.topo.log_path(f"{self.name}-{name}"), "wb") as logf:
            kw.setdefault("stdout", logf)
            kw.setdefault("stderr", subprocess.STDOUT)
            p = subprocess.Popen(self.cmd(args), env=full_env, stdin=subprocess.DEVNULL, **kw)
        self.topo.procs.append(p)
        return p

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


class Topology:
    """A set of namespaces (and the processes in them) with one lifetime."""

    def __init__(self, tag: str = "", *, log_dir: Path | None = None,
                 keep_logs: bool | None = None) -> None:
        self.index = next(_counter)
        self.prefix = f"fzt{os.getpid()}{tag}{self.index}"
        self.namespaces: list[Netns] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_dir = log_dir or Path("/tmp") / f"{self.prefix}-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the process logs are removed with the namespaces unless asked for (FZ_KEEP_TEST_LOGS=1)
        self.keep_logs = keep_logs if keep_logs is not None else os.environ.get("FZ_KEEP_TEST_LOGS") == "1"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        """Everything a process started with ``popen(..., log_name=name)`` has printed so far."""
        matches = sorted(self.log_dir.glob(f"*-{name}.log"))
        return "\n".join(p.read_text(errors="replace") for p in matches)

    def ifname(self, tag: str) -> str:
        """An interface name unique to this run (<= 15 bytes) for things with global state such
        as UAPI sockets under /run, which namespaces do not separate."""
        name = f"fz{os.getpid() % 100000}{self.index % 100}{tag}"
        if len(name) > 15:
            raise ValueError(f"interface name {name!r} is longer than 15 bytes")
        return name

    def netns(self, short: str) -> Netns:
        ns = Netns(self, f"{self.prefix}{short}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def veth(self, a: Netns, b: Netns, a_addr: str | None, b_addr: str | None, *,
             a_if: str = "eth0", b_if: str = "eth0", mtu: int | None = None) -> None:
        """Join ``a`` and ``b`` with a veth pair (named ``a_if`` in a, ``b_if`` in b), addresses
        given as ``addr/prefix``, both ends up."""
        tmp_a, tmp_b = f"fzv{os.getpid() % 100000}a{len(self.namespaces)}", f"fzv{os.getpid() % 100000}b{len(self.namespaces)}"
        tmp_a, tmp_b = tmp_a[:15], tmp_b[:15]
        run(["ip", "link", "add", tmp_a, "netns", a.name, "type", "veth", "peer", "name", tmp_b,
             "netns", b.name])
        for ns, tmp, ifn, addr in ((a, tmp_a, a_if, a_addr), (b, tmp_b, b_if, b_addr)):
            ns.run(["ip", "link", "set", tmp, "name", ifn])
            if mtu:
                ns.run(["ip", "link", "set", ifn, "mtu", str(mtu)])
            if addr:
                ns.run(["ip", "addr", "add", addr, "dev", ifn] + (["nodad"] if ":" in addr else []))
            ns.run(["ip", "link", "set", ifn, "up"])

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10) -> int | None:
        """SIGTERM then, if needed, SIGKILL one process this topology started."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        return p.returncode

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()
        if not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(pred: Any, timeout: float = 10, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``pred()`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
