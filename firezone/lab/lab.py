"""The network-namespace lab: build the topology, run its services, tear everything down.

Theory of operation
-------------------
A lab is identified by a prefix (``fz`` + 4 hex digits by default). Every namespace is called
``<prefix>-<suffix>`` (see :mod:`firezone.lab.topology`). Before anything is created, a state file
``<state_root>/<prefix>/state.json`` lists every namespace the lab will own; every process the lab
starts is added to it (PID plus kernel start time, so a reused PID is never signalled). Because the
record always precedes the thing it records, ``down()`` -- run by the same process, by a later
``fz lab down``, or by a test fixture after a crash -- can remove everything: tracked processes
(SIGTERM, then SIGKILL), the namespaces, ``/etc/netns/<ns>`` and the state directory.

veth pairs are created directly inside their namespaces (``ip link add ... netns A type veth peer
... netns B``), so no interface ever exists in the root namespace and device names only need to be
unique per namespace.

Routers run one nftables table ``inet fzlab``, rendered from the lab's state by
:func:`router_ruleset` and replaced atomically with ``nft -f -``:

- NAT ``easy``: ``masquerade`` keeps the source port when it can, so one inner socket has one
  public mapping for every destination (endpoint-independent mapping, RFC 4787 §4.1);
- NAT ``symmetric``: ``masquerade random`` picks a new port per connection (address-and-port
  dependent mapping);
- inbound traffic from the WAN is forwarded (or delivered to the router) only when conntrack
  relates it to outbound traffic; ICMP to the router itself is allowed;
- "UDP between the sites blocked": each router drops forwarded UDP to the other router;
- loss of P %: ``numgen random mod 10000 < 100*P`` drops forwarded packets (both directions;
  100 % is a plain ``drop``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from firezone.lab import topology as topo

log = logging.getLogger(__name__)

DEFAULT_STATE_ROOT = Path("/run/fz-lab")
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
STATE_VERSION = 1
PREFIX_RE = re.compile(r"^fz[a-z0-9]{1,8}$")
_NS_RE = re.compile(r"^(fz[a-z0-9]{1,8})-(" + "|".join(topo.NAMESPACES) + r")$")

REQUIRED_TOOLS: dict[str, str] = {
    "ip": "iproute2",
    "ss": "iproute2",
    "bridge": "iproute2",
    "nft": "nftables",
    "sysctl": "procps",
    "dnsmasq": "dnsmasq-base",
    "iperf3": "iperf3",
}

LAB_NAT_CHOICES = ("easy", "symmetric", "blocked")


class LabError(Exception):
    """The lab cannot do what was asked (not root, a tool missing, a command failed)."""


class LabExecError(subprocess.CalledProcessError):
    """A command run with ``Lab.exec(..., check=True)`` exited non-zero."""

    def __init__(self, node: str, returncode: int, cmd: Sequence[str], output: Any, stderr: Any) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.node = node

    def __str__(self) -> str:
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        tail = (err or "").strip().splitlines()[-3:]
        detail = f": {' | '.join(tail)}" if tail else ""
        return f"{self.node}: {' '.join(map(str, self.cmd))} exited with {self.returncode}{detail}"


class _LogFile:
    """Sentinel: write the process's output to a log file in the lab's state directory."""

    def __repr__(self) -> str:
        return "LOG"


LOG: Any = _LogFile()


def check_prerequisites() -> None:
    """Raise LabError with a plain message when not root or a system tool is missing."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth, nftables): run it with sudo")
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise LabError("missing system tool: " + ", ".join(missing))


def router_ruleset(*, nat: str, loss: float, block_udp_to: tuple[str, str] | None) -> str:
    """The ``inet fzlab`` table of a NAT router; replaces any previous version atomically."""
    if nat not in topo.NAT_MODES:
        raise ValueError(f"unknown NAT mode {nat!r} (choose from {', '.join(topo.NAT_MODES)})")
    if not 0.0 <= loss <= 100.0:
        raise ValueError(f"loss must be between 0 and 100 percent, not {loss}")
    fwd: list[str] = []
    if loss >= 100:
        # numgen's modulus bounds the comparison: "< 10000" is out of range for nft.
        fwd.append('counter drop comment "loss"')
    elif loss > 0:
        fwd.append(f"numgen random mod 10000 < {round(loss * 100)} counter drop comment \"loss\"")
    if block_udp_to is not None:
        v4, v6 = block_udp_to
        fwd.append(f'oifname "wan" ip daddr {v4} meta l4proto udp counter drop comment "sites"')
        fwd.append(f'oifname "wan" ip6 daddr {v6} meta l4proto udp counter drop comment "sites"')
    fwd.append('iifname "wan" ct state established,related accept')
    fwd.append('iifname "wan" counter drop comment "unsolicited"')
    masq = "masquerade random" if nat == "symmetric" else "masquerade"
    body = "\n".join(f"\t\t{r}" for r in fwd)
    return (
        "table inet fzlab\n"
        "delete table inet fzlab\n"
        "table inet fzlab {\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{body}\n"
        "\t}\n"
        # Unsolicited packets to the router itself are dropped before conntrack confirms them:
        # a confirmed entry for (peer -> router:port) would make the router pick another
        # port for an outgoing flow to that peer, breaking hole punching.
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiifname "wan" ct state established,related accept\n'
        '\t\tiifname "wan" meta l4proto { icmp, ipv6-icmp } accept\n'
        '\t\tiifname "wan" counter drop comment "unsolicited"\n'
        "\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f'\t\toifname "wan" {masq}\n'
        "\t}\n"
        "}\n"
    )


def proc_start_time(pid: int) -> int | None:
    """The kernel start time (clock ticks since boot) of ``pid``; None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _same_process(pid: int, start: int | None) -> bool:
    return start is not None and proc_start_time(pid) == start


def _netns_exists(ns: str) -> bool:
    return (NETNS_RUN / ns).exists()


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30) -> str:
    log.debug("lab: %s", " ".join(argv))
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except FileNotFoundError as e:
        raise LabError(f"missing system tool: {argv[0]}") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)} timed out after {timeout} s") from e
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _ip_batch(lines: list[str], ns: str | None = None) -> None:
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    _run(argv, input="\n".join(lines) + "\n")


_LIVE_LABS: weakref.WeakSet[Lab] = weakref.WeakSet()


@atexit.register
def _down_live_labs() -> None:
    for lab in list(_LIVE_LABS):
        if lab.owned:
            try:
                lab.down()
            except Exception:
                log.exception("lab %s: teardown at exit failed", lab.prefix)


class Lab:
    """One running lab; created by :meth:`up` or attached to with :meth:`load`."""

    def __init__(self, prefix: str, state_root: Path, state: dict[str, Any]) -> None:
        self.prefix = prefix
        self.state_root = Path(state_root)
        self.state_dir = self.state_root / prefix
        self._state = state
        self._children: dict[int, subprocess.Popen[Any]] = {}
        self._log_files: list[IO[Any]] = []

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def up(cls, prefix: str | None = None, nat: str = "easy", loss: float = 0.0,
           state_root: Path = DEFAULT_STATE_ROOT, *, persistent: bool = False) -> Lab:
        """Build the topology and start the resource services; on any failure remove it all.

        ``nat``: easy | symmetric | blocked (easy NAT with UDP between the two sites dropped), for
        both routers. ``loss``: percent of packets dropped by the client router. ``persistent``
        labs (``fz lab up``) outlive the creating process; others count as stale once it is gone.
        """
        if nat not in LAB_NAT_CHOICES:
            raise ValueError(f"unknown NAT mode {nat!r} (choose from {', '.join(LAB_NAT_CHOICES)})")
        if not 0.0 <= loss <= 100.0:
            raise ValueError(f"loss must be between 0 and 100 percent, not {loss}")
        check_prerequisites()
        state_root = Path(state_root)
        if prefix is None:
            prefix = cls._new_prefix(state_root)
        elif not PREFIX_RE.match(prefix):
            raise ValueError(f"lab prefix must match {PREFIX_RE.pattern}, not {prefix!r}")
        state_dir = state_root / prefix
        if state_dir.exists() or any(_netns_exists(f"{prefix}-{s}") for s in topo.NAMESPACES):
            raise LabError(f"a lab with prefix {prefix} already exists (fz lab down --prefix {prefix})")
        state_dir.mkdir(parents=True)
        (state_dir / "logs").mkdir()
        me = os.getpid()
        link_nat = "easy" if nat == "blocked" else nat
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "prefix": prefix,
            "created": time.time(),
            "owner": None if persistent else {"pid": me, "start": proc_start_time(me)},
            "state_dir": str(state_dir),
            "namespaces": [f"{prefix}-{s}" for s in topo.NAMESPACES],
            "etc_dirs": [str(NETNS_ETC / f"{prefix}-{s}") for s in topo.NAMESPACES],
            "nat": {r: link_nat for r in topo.ROUTERS},
            "loss": {r: 0.0 for r in topo.ROUTERS},
            "udp_blocked": nat == "blocked",
            "processes": [],
        }
        state["loss"]["client-router"] = float(loss)
        lab = cls(prefix, state_root, state)
        lab._save()
        _LIVE_LABS.add(lab)
        t0 = time.monotonic()
        try:
            lab._build()
            for r in topo.ROUTERS:
                lab._apply_router(r)
            lab._write_resolv_confs()
            lab._start_services()
        except BaseException:
            log.debug("lab %s: bring-up failed, tearing down", prefix)
            lab.down()
            raise
        log.info("lab %s up in %.2f s", prefix, time.monotonic() - t0)
        return lab

    @classmethod
    def load(cls, prefix: str, state_root: Path = DEFAULT_STATE_ROOT) -> Lab:
        """Attach to a lab that is up, from its state file."""
        path = Path(state_root) / prefix / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab with prefix {prefix} (no {path})") from None
        except (OSError, ValueError) as e:
            raise LabError(f"unreadable lab state {path}: {e}") from None
        return cls(prefix, Path(state_root), state)

    @classmethod
    def prefixes(cls, state_root: Path = DEFAULT_STATE_ROOT) -> list[str]:
        """Prefixes of the labs that have a state file under ``state_root``."""
        root = Path(state_root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "state.json").is_file())

    @classmethod
    def down_all(cls, state_root: Path = DEFAULT_STATE_ROOT, *, stale_only: bool = False) -> list[str]:
        """Remove every lab (or, with ``stale_only``, labs whose creating process has died).

        Without ``stale_only`` also removes lab-named namespaces and /etc/netns dirs that no state
        file mentions (left by a crash before the state file existed, or a deleted state root).
        Returns the prefixes removed.
        """
        removed: list[str] = []
        for prefix in cls.prefixes(state_root):
            try:
                lab = cls.load(prefix, state_root)
            except LabError as e:
                if stale_only:
                    log.warning("lab %s: %s", prefix, e)
                    continue
                shutil.rmtree(Path(state_root) / prefix, ignore_errors=True)
                removed.append(prefix)
                continue
            if stale_only and not lab.stale:
                continue
            lab.down()
            removed.append(prefix)
        if stale_only:
            return removed
        orphans: set[str] = set()
        if NETNS_RUN.is_dir():
            orphans |= {p.name for p in NETNS_RUN.iterdir() if _NS_RE.match(p.name)}
        if NETNS_ETC.is_dir():
            orphans |= {p.name for p in NETNS_ETC.iterdir() if _NS_RE.match(p.name)}
        recorded = set(removed)
        for ns in sorted(orphans):
            m = _NS_RE.match(ns)
            assert m is not None
            if m.group(1) in recorded or any(
                    (root / m.group(1)).exists() for root in (Path(state_root), DEFAULT_STATE_ROOT)):
                continue
            log.info("removing leftover namespace %s", ns)
            if _netns_exists(ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            if m.group(1) not in removed:
                removed.append(m.group(1))
        return removed

    def down(self) -> None:
        """Stop the lab's processes, delete its namespaces and files. Safe to call twice."""
        _LIVE_LABS.discard(self)
        state = self._read_state() or self._state
        for proc in reversed(state.get("processes", [])):
            self._stop_process(proc)
        for ns in state.get("namespaces", []):
            if not _netns_exists(ns):
                continue
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
            strays = r.stdout.split()
            if strays:
                log.warning("lab %s: processes the lab did not start are still in %s: %s",
                            self.prefix, ns, " ".join(strays))
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, check=False)
            if r.returncode != 0 and _netns_exists(ns):
                log.warning("lab %s: ip netns del %s: %s", self.prefix, ns, r.stderr.strip())
        for d in state.get("etc_dirs", []):
            shutil.rmtree(d, ignore_errors=True)
        for f in self._log_files:
            f.close()
        self._log_files.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self._state["processes"] = []

    # -- queries ---------------------------------------------------------------------------

    @property
    def owned(self) -> bool:
        """True when this process created the lab (and tears it down at exit)."""
        owner = self._state.get("owner")
        return owner is not None and owner.get("pid") == os.getpid()

    @property
    def stale(self) -> bool:
        """True when the process that created a non-persistent lab is gone."""
        owner = self._state.get("owner")
        return owner is not None and not _same_process(owner["pid"], owner.get("start"))

    @property
    def nat(self) -> dict[str, str]:
        return dict(self._state["nat"])

    @property
    def loss(self) -> dict[str, float]:
        return dict(self._state["loss"])

    @property
    def udp_blocked(self) -> bool:
        return bool(self._state["udp_blocked"])

    @staticmethod
    def nodes() -> list[str]:
        return list(topo.NODES)

    def ns(self, node: str) -> str:
        """The namespace name of ``node`` (e.g. ``client`` -> ``fz1a2b-client``)."""
        return f"{self.prefix}-{self._node(node).ns}"

    def addr(self, node: str, family: int = 4, net: str | None = None) -> str:
        """The address of ``node`` (its first interface, or the one named ``net``: wan/lan/res)."""
        n = self._node(node)
        if not n.ifaces:
            raise LabError(f"node {node} has no address")
        if net is None:
            iface = next(iter(n.ifaces.values()))
        elif net in n.ifaces:
            iface = n.ifaces[net]
        else:
            raise LabError(f"node {node} has no {net} interface (has: {', '.join(n.ifaces)})")
        if family == 4:
            return topo.ip_of(iface.v4)
        if family == 6:
            return topo.ip_of(iface.v6)
        raise ValueError(f"family must be 4 or 6, not {family}")

    @property
    def log_dir(self) -> Path:
        """Where the lab's processes (and those started with ``popen``) write their output."""
        return self.state_dir / "logs"

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"))

    def processes(self) -> list[dict[str, Any]]:
        """The processes the lab tracks, each with ``alive``."""
        state = self._read_state() or self._state
        return [dict(p, alive=_same_process(p["pid"], p.get("start"))) for p in state["processes"]]

    def status(self) -> dict[str, Any]:
        """A summary for ``fz lab status``."""
        st = self._read_state() or self._state
        return {
            "prefix": self.prefix,
            "state_dir": str(self.state_dir),
            "persistent": st.get("owner") is None,
            "stale": self.stale,
            "nat": st["nat"],
            "loss": st["loss"],
            "udp_blocked": st["udp_blocked"],
            "namespaces": {ns: _netns_exists(ns) for ns in st["namespaces"]},
            "processes": self.processes(),
        }

    # -- running things --------------------------------------------------------------------

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``node``'s namespace."""
        if not argv:
            raise ValueError("empty command")
        return ["ip", "netns", "exec", self.ns(node), *map(str, argv)]

    def exec(self, node: str, argv: Sequence[str], *, check: bool = True, timeout: float | None = 30,
             env: Mapping[str, str] | None = None, input: str | bytes | None = None,
             text: bool = True) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``node`` and wait; output captured. ``env`` adds to the environment."""
        cmd = self.command(node, argv)
        log.debug("lab %s: exec in %s: %s", self.prefix, node, " ".join(cmd[4:]))
        r = subprocess.run(cmd, capture_output=True, text=text, timeout=timeout, input=input,
                           env=self._env(env), check=False)
        if check and r.returncode != 0:
            raise LabExecError(node, r.returncode, list(argv), r.stdout, r.stderr)
        return r

    def popen(self, node: str, argv: Sequence[str], *, stdout: Any = LOG, stderr: Any = subprocess.STDOUT,
              stdin: Any = subprocess.DEVNULL, env: Mapping[str, str] | None = None,
              name: str | None = None, text: bool = True) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``; the lab stops it on ``down()`` (also after a crash).

        By default stdout and stderr go to ``<state_dir>/logs/<node>.<name>.log`` (the path is
        available as ``proc.log_path``); the process gets its own session, so ``down()`` signals
        its whole process group.
        """
        cmd = self.command(node, argv)
        name = name or Path(str(argv[0])).name
        log_path: Path | None = None
        if stdout is LOG:
            log_path = self._log_path(node, name)
            f = open(log_path, "ab")  # noqa: SIM115 - closed in down()
            self._log_files.append(f)
            stdout = f
        if stderr is LOG:
            stderr = subprocess.STDOUT if log_path is not None else subprocess.DEVNULL
        log.debug("lab %s: popen in %s: %s", self.prefix, node, " ".join(cmd[4:]))
        p = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=stdin, env=self._env(env),
                             start_new_session=True, text=text)
        p.log_path = log_path  # type: ignore[attr-defined]
        self._children[p.pid] = p
        self._state["processes"].append({
            "pid": p.pid, "start": proc_start_time(p.pid), "node": node, "name": name,
            "argv": [str(a) for a in argv], "log": str(log_path) if log_path else None,
        })
        self._save()
        return p

    def stop(self, proc: subprocess.Popen[Any] | int, timeout: float = 5.0) -> None:
        """Stop one tracked process (SIGTERM, then SIGKILL) and forget it."""
        pid = proc if isinstance(proc, int) else proc.pid
        for p in list(self._state["processes"]):
            if p["pid"] == pid:
                self._stop_process(p, timeout)
                self._state["processes"].remove(p)
                self._save()
                return
        raise LabError(f"process {pid} is not tracked by lab {self.prefix}")

    # -- network conditions ----------------------------------------------------------------

    def set_nat(self, router: str, mode: str) -> None:
        """Switch ``router``'s NAT between ``easy`` and ``symmetric`` (applies to new flows)."""
        self._router_ns(router)
        if mode not in topo.NAT_MODES:
            raise ValueError(f"unknown NAT mode {mode!r} (choose from {', '.join(topo.NAT_MODES)})")
        self._state["nat"][router] = mode
        self._apply_router(router)
        self._save()

    def set_loss(self, router: str, percent: float) -> None:
        """Drop ``percent`` % of the packets ``router`` forwards (both directions)."""
        self._router_ns(router)
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"loss must be between 0 and 100 percent, not {percent}")
        self._state["loss"][router] = float(percent)
        self._apply_router(router)
        self._save()

    def block_udp_between_sites(self, on: bool) -> None:
        """Drop (or allow again) UDP between the client site and the gateway site."""
        self._state["udp_blocked"] = bool(on)
        for r in topo.ROUTERS:
            self._apply_router(r)
        self._save()

    def flush_conntrack(self, router: str) -> None:
        """Forget ``router``'s connection tracking (and so its NAT mappings).

        A changed NAT mode applies to new flows only; flush to make existing ones pick it up
        (established TCP connections through the router then break).
        """
        ns = f"{self.prefix}-{self._router_ns(router)}"
        _run(["ip", "netns", "exec", ns, sys.executable, "-c",
              "from pyroute2 import Conntrack; Conntrack().flush()"])

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _new_prefix(state_root: Path) -> str:
        for _ in range(100):
            p = "fz" + secrets.token_hex(2)
            if not (state_root / p).exists() and not any(
                    _netns_exists(f"{p}-{s}") for s in topo.NAMESPACES):
                return p
        raise LabError("could not find a free lab prefix")

    def _node(self, node: str) -> topo.Node:
        try:
            return topo.NODES[node]
        except KeyError:
            raise LabError(f"unknown lab node {node!r} (nodes: {', '.join(topo.NODES)})") from None

    def _router_ns(self, router: str) -> str:
        try:
            return topo.ROUTER_NS[router]
        except KeyError:
            raise LabError(f"unknown router {router!r} (routers: {', '.join(topo.ROUTERS)})") from None

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str] | None:
        return None if env is None else {**os.environ, **env}

    def _log_path(self, node: str, name: str) -> Path:
        d = self.state_dir / "logs"
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{node}.{name}")
        path = d / f"{base}.log"
        n = 1
        while path.exists():
            n += 1
            path = d / f"{base}.{n}.log"
        return path

    def _save(self) -> None:
        path = self.state_dir / "state.json"
        if not self.state_dir.is_dir():
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._state, indent=2))
        os.replace(tmp, path)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "state.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def _stop_process(self, proc: Mapping[str, Any], timeout: float = 5.0) -> None:
        pid, start = proc["pid"], proc.get("start")
        child = self._children.pop(pid, None)
        if not _same_process(pid, start):
            if child is not None:
                child.poll()
            return
        log.debug("lab %s: stopping %s (pid %d)", self.prefix, proc.get("name"), pid)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if child is not None and child.poll() is not None:
                    return
                if child is None and not _same_process(pid, start):
                    return
                time.sleep(0.02)
        log.warning("lab %s: process %d did not exit", self.prefix, pid)

    def _build(self) -> None:
        p = self.prefix
        # All namespaces and veth pairs in one batch; each veth is born in its namespace.
        _ip_batch([f"netns add {p}-{s}" for s in topo.NAMESPACES])
        # Before any device exists: no IPv6 duplicate address detection (link-local addresses
        # would stay tentative for a second and the first packets to a neighbour get lost).
        for s in topo.NAMESPACES:
            sysctls = ["net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"]
            if s in topo.FORWARDING:
                sysctls += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
            _run(["ip", "netns", "exec", f"{p}-{s}", "sysctl", "-q", "-w", *sysctls])
        _ip_batch([f"link add {da} netns {p}-{a} type veth peer name {db} netns {p}-{b}"
                   for a, da, b, db in topo.VETHS])
        devs: dict[str, set[str]] = {s: set() for s in topo.NAMESPACES}
        for a, da, b, db in topo.VETHS:
            devs[a].add(da)
            devs[b].add(db)
        addrs: dict[str, list[topo.Iface]] = {s: [] for s in topo.NAMESPACES}
        seen: set[tuple[str, str, str]] = set()
        for node in topo.NODES.values():
            for iface in node.ifaces.values():
                if (iface.ns, iface.dev, iface.v4) not in seen:
                    seen.add((iface.ns, iface.dev, iface.v4))
                    addrs[iface.ns].append(iface)
        for i, s in enumerate(topo.NAMESPACES):
            cmds = ["link set lo up"]
            if s in topo.BRIDGES:
                br, ports = topo.BRIDGES[s]
                # A fixed (locally administered) MAC: without one a bridge takes the lowest port
                # MAC, which changes as ports join.
                cmds.append(f"link add {br} address 02:66:7a:00:00:{i:02x} type bridge "
                            "stp_state 0 mcast_snooping 0")
                cmds += [f"link set {port} master {br}" for port in ports]
                cmds.append(f"link set {br} up")
            cmds += [f"link set {d} up" for d in sorted(devs[s])]
            for iface in addrs[s]:
                cmds.append(f"addr add {iface.v4} dev {iface.dev}")
                cmds.append(f"addr add {iface.v6} dev {iface.dev} nodad")
            _ip_batch(cmds, f"{p}-{s}")
        for s, (gw4, gw6) in topo.DEFAULT_ROUTES.items():
            _ip_batch([f"route add default via {gw4}", f"route add ::/0 via {gw6}"], f"{p}-{s}")

    def _apply_router(self, router: str) -> None:
        ns = f"{self.prefix}-{self._router_ns(router)}"
        block = None
        if self._state["udp_blocked"]:
            other = topo.OTHER_SITE[router]
            block = (self.addr(other, 4, "wan"), self.addr(other, 6, "wan"))
        rules = router_ruleset(nat=self._state["nat"][router], loss=self._state["loss"][router],
                               block_udp_to=block)
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules)

    def _write_resolv_confs(self) -> None:
        for s in topo.NAMESPACES:
            d = NETNS_ETC / f"{self.prefix}-{s}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "resolv.conf").write_text(f"nameserver {topo.RESOLVER[s]}\n")

    def _start_services(self) -> None:
        sd = self.state_dir
        public = topo.dnsmasq_conf(
            listen=(topo.PUBLIC_DNS4, topo.PUBLIC_DNS6),
            zones=[(topo.PUBLIC_ZONE, topo.PUBLIC_RECORDS, "203.0.113")],
            log_file=str(sd / "logs" / "public-dns.queries.log"))
        private = topo.dnsmasq_conf(
            listen=(topo.PRIVATE_DNS4, topo.PRIVATE_DNS6),
            zones=[(topo.PRIVATE_ZONE, topo.PRIVATE_RECORDS, "198.51.100"),
                   # the gateways reach the portal and relays by name too
                   (topo.PUBLIC_ZONE, topo.PUBLIC_RECORDS, "203.0.113")],
            log_file=str(sd / "logs" / "private-dns.queries.log"))
        procs = []
        for node, conf in (("public-dns", public), ("private-dns", private)):
            path = sd / f"{node}.dnsmasq.conf"
            path.write_text(conf)
            procs.append(self.popen(node, [
                "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                f"--conf-file={path}", f"--pid-file={sd / (node + '.dnsmasq.pid')}"], name="dnsmasq"))
        procs.append(self.popen("http", [sys.executable, "-m", "firezone.lab.httpd", "--ports",
                                         ",".join(map(str, topo.HTTP_PORTS))], name="httpd"))
        # A public web server (www.example.test) on the public DNS host: /ip shows where the
        # request came from, e.g. which site's NAT carried it.
        procs.append(self.popen("public-dns", [sys.executable, "-m", "firezone.lab.httpd", "--ports", "80"],
                                name="httpd"))
        procs.append(self.popen("iperf3", ["iperf3", "-s", "--forceflush"], name="iperf3"))
        self._wait_links_up()
        self._wait_listening("public-dns", {("udp", 53), ("tcp", 80)}, procs)
        self._wait_listening("http", {("udp", 53), ("tcp", 53), *(("tcp", p) for p in topo.HTTP_PORTS),
                                      ("tcp", topo.IPERF3_PORT)}, procs)

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        # The kernel reports a veth's carrier to the bridge (and operstate) from its link-watch
        # work, which batches events for up to a second; until then a bridge port drops frames.
        deadline = time.monotonic() + timeout
        pending = [f"{self.prefix}-{s}" for s in topo.NAMESPACES]
        while pending:
            still = []
            for ns in pending:
                links = json.loads(_run(["ip", "-n", ns, "-j", "link", "show"]) or "[]")
                down = [ln["ifname"] for ln in links if ln["ifname"] != "lo" and ln.get("operstate") != "UP"]
                if not down and topo.BRIDGES.get(ns.split("-", 1)[1]):
                    ports = json.loads(_run(["bridge", "-n", ns, "-j", "link", "show"]) or "[]")
                    down = [pt["ifname"] for pt in ports if pt.get("state") != "forwarding"]
                if down:
                    still.append(ns)
                    if time.monotonic() > deadline:
                        raise LabError(f"links in {ns} not up after {timeout} s: {', '.join(down)}")
            pending = still
            if pending:
                time.sleep(0.05)

    def _wait_listening(self, node: str, want: set[tuple[str, int]], procs: list[subprocess.Popen[Any]],
                        timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        missing = want
        while True:
            for pr in procs:
                if pr.poll() is not None:
                    tail = ""
                    lp = getattr(pr, "log_path", None)
                    if lp is not None and Path(lp).exists():
                        tail = " | ".join(Path(lp).read_text(errors="replace").strip().splitlines()[-3:])
                    args = pr.args[4:] if isinstance(pr.args, list) else [pr.args]
                    raise LabError(f"lab service {' '.join(map(str, args))} exited "
                                   f"({pr.returncode}): {tail}")
            out = self.exec(node, ["ss", "-Hlntu"]).stdout
            have = set(_listening(out))
            missing = {w for w in want if w not in have}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LabError(f"lab services in {node} not listening after {timeout} s: "
                               + ", ".join(f"{p}/{n}" for p, n in sorted(missing)))
            time.sleep(0.05)


def _listening(ss_out: str) -> Iterator[tuple[str, int]]:
    for line in ss_out.splitlines():
        cols = line.split()
        if len(cols) < 5:
            continue
        port = cols[4].rsplit(":", 1)[-1]
        if port.isdigit():
            yield cols[0], int(port)
