#!/usr/bin/env python3
"""End-to-end tunnel throughput: iperf3 from the lab client to the iperf3 resource through fz.

One lab (``firezone.lab``) with the whole fz system (portal, relays, gateway-1, client; see
tests/e2e/fz_lab_system.py). The anchor runs in the same lab: a wireguard-go tunnel between the
client namespace and gateway-1 (both ends behind the lab's easy NATs, each side given the other's
public address so the simultaneous handshakes open the NAT mappings, as fz's direct path does),
gateway-1 masquerading the anchor's tunnel range towards the resource net. The client reaches
the resource over the anchor only from the anchor's tunnel address (``iperf3 -B``, a policy
routing rule), so fz's routes stay untouched. Runs of the two modes alternate.

    sudo .venv/bin/python bench/tunnel_e2e/run.py             # 5 x 10 s
    sudo .venv/bin/python bench/tunnel_e2e/run.py --quick     # 2 x 3 s
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from firezone.lab import Lab
from tests.e2e.fz_lab_system import FzSystem

SITE, USER, GROUP = "lab", "alice@acme.test", "eng"
IPERF = "198.51.100.30"
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
WG_IF = {"client": "wgbc0", "gateway-1": "wgbg0"}  # /var/run/wireguard is shared
WG_NET = "10.222.0"
WG_TABLE = "222"
CLIENT_PUB, GW_PUB = "203.0.113.20", "203.0.113.30"  # the two NAT routers' wan addresses
MTU = 1420


def start_fz(lab: Lab, workdir: Path, gateways: tuple[str, ...] = ("gateway-1",)) -> FzSystem:
    fz = FzSystem(lab, workdir)
    fz.start_portal()
    fz.start_relays()
    fz.admin("site", "add", SITE)
    for gw in gateways:
        fz.start_gateway(gw, site=SITE)
    fz.admin("group", "add", GROUP)
    fz._groups.add(GROUP)
    fz.admin("resource", "add", "resource-net", "--site", SITE, "--address", "198.51.100.0/24")
    fz.admin("policy", "add", "--group", GROUP, "--resource", "resource-net")
    fz.start_client("client", user=USER, groups=(GROUP,))
    fz.wait(lambda: fz.curl("client", "http://198.51.100.10/", timeout=3).returncode == 0, 30, "resource via fz")
    return fz


def keypair() -> tuple[str, str]:
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv + "\n", capture_output=True, text=True,
                         check=True).stdout.strip()
    return priv, pub


def start_wggo_anchor(lab: Lab) -> list[subprocess.Popen]:
    """wireguard-go client <-> gateway-1; returns the two processes (the lab stops them on down)."""
    kc, kg = keypair(), keypair()
    sides = [("client", kc, 51900, f"{WG_NET}.1", kg[1], f"{GW_PUB}:51901", f"{WG_NET}.2/32,198.51.100.0/24"),
             ("gateway-1", kg, 51901, f"{WG_NET}.2", kc[1], f"{CLIENT_PUB}:51900", f"{WG_NET}.1/32")]
    procs = []
    for node, (priv, _), port, addr, peer, endpoint, allowed in sides:
        wif = WG_IF[node]
        p = lab.popen(node, ["wireguard-go", "-f", wif], env=WG_ENV, name="wireguard-go")
        procs.append(p)
        deadline = time.monotonic() + 10
        while not _wg_ready(lab, node, wif) and time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"wireguard-go exited in {node}")
            time.sleep(0.1)
        keyfile = lab.state_dir / f"wgbench-{node}.key"
        keyfile.write_text(priv + "\n")
        os.chmod(keyfile, 0o600)
        lab.exec(node, ["wg", "set", wif, "listen-port", str(port), "private-key", str(keyfile),
                        "peer", peer, "endpoint", endpoint, "allowed-ips", allowed,
                        "persistent-keepalive", "1"])
        lab.exec(node, ["ip", "addr", "add", f"{addr}/24", "dev", wif])
        lab.exec(node, ["ip", "link", "set", wif, "mtu", str(MTU), "up"])
    # client: only traffic from the anchor's address takes the anchor
    lab.exec("client", ["ip", "route", "add", "198.51.100.0/24", "dev", WG_IF["client"], "table", WG_TABLE])
    lab.exec("client", ["ip", "rule", "add", "from", f"{WG_NET}.1", "lookup", WG_TABLE, "priority", "50"])
    lab.exec("gateway-1", ["nft", "-f", "-"], input=(
        "table ip wgbench {\n chain post {\n  type nat hook postrouting priority 100;\n"
        f"  ip saddr {WG_NET}.0/24 oifname != \"{WG_IF['gateway-1']}\" masquerade\n }}\n}}\n"))
    lab.exec("gateway-1", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if lab.exec("client", ["ping", "-c1", "-W1", "-I", f"{WG_NET}.1", IPERF], check=False).returncode == 0:
            return procs
    raise RuntimeError("wireguard-go anchor did not come up")


def _wg_ready(lab: Lab, node: str, wif: str) -> bool:
    return lab.exec(node, ["wg", "show", wif], check=False).returncode == 0


def iperf(lab: Lab, secs: int, bind: str | None) -> float:
    args = ["iperf3", "-J", "-c", IPERF, "-t", str(secs), "-O", "1"] + (["-B", bind] if bind else [])
    r = lab.exec("client", args, check=False, timeout=secs + 30)
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3: {r.stdout[-500:]} {r.stderr[-500:]}") from None
    if "error" in j:
        raise RuntimeError(f"iperf3: {j['error']}")
    return float(j["end"]["sum_received"]["bits_per_second"]) / 1e6


def machine() -> dict[str, str]:
    import platform
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")

    def ver(cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (r.stdout or r.stderr).splitlines()[0] if (r.stdout or r.stderr) else "?"
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "wireguard-go": ver(["wireguard-go", "--version"]),
            "iperf3": ver(["iperf3", "--version"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="2 runs x 3 s")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.secs = 2, 3
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res: dict[str, list[float]] = {"fz": [], "wggo": []}
    lab = Lab.up()
    try:
        with tempfile.TemporaryDirectory(prefix="fzbench-") as tmp:
            fz = start_fz(lab, Path(tmp))
            # the connection may start relayed and move to the direct path a few seconds later
            fz.wait(lambda: [c.get("path") for c in (fz.status("client") or {}).get("connections", [])]
                    == ["direct"], 30, "the direct path")
            st = fz.status("client") or {}
            paths = [c.get("path") for c in st.get("connections", [])]
            start_wggo_anchor(lab)
            for _ in range(args.runs):
                res["fz"].append(iperf(lab, args.secs, None))
                res["wggo"].append(iperf(lab, args.secs, f"{WG_NET}.1"))
                print(f"fz {res['fz'][-1]:.0f}  wireguard-go {res['wggo'][-1]:.0f} Mbit/s", flush=True)
            st = fz.status("client") or {}
            paths_after = [c.get("path") for c in st.get("connections", [])]
            for key in list(fz.procs):
                fz.stop(key)
    finally:
        lab.down()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nfz path(s) before the runs: {paths}, after: {paths_after}")
    for k, v in res.items():
        print(f"{k:5s} TCP median {med[k]:8.1f} Mbit/s  runs {', '.join(f'{x:.0f}' for x in v)}")
    print(f"ratio fz / wireguard-go: {med['fz'] / med['wggo']:.3f}")
    for k, fact in machine().items():
        print(f"{k}: {fact}")
    print("\nJSON:", json.dumps({"runs": res, "median": med, "fz_paths": paths, "fz_paths_after": paths_after, "machine": machine()}))


if __name__ == "__main__":
    main()
