"""`fz lab up` starts the whole seeded system; `fz lab exec` reaches it; `fz lab down` removes it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_lab import lab_namespaces, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

BIN = Path(sys.executable).parent
FZ = str(BIN / "fz")
# `fz` inside the lab's namespaces is this checkout's, whatever else is on PATH.
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("FIREZONE_")},
       "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "NO_COLOR": "1", "COLUMNS": "200"}


def fz(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FZ, *args], capture_output=True, text=True, timeout=timeout, check=False, env=ENV)


def test_lab_up_runs_the_seeded_system(_lab_janitor: None) -> None:
    prefix = "fzs" + secrets.token_hex(3)
    pids: list[int] = []
    try:
        r = fz("--json", "lab", "up", "--prefix", prefix, timeout=180)
        assert r.returncode == 0, r.stderr[-4000:]
        up = json.loads(r.stdout)
        assert up["prefix"] == prefix and up["persistent"] is True
        assert up["portal_url"] == "http://203.0.113.10:8080"
        assert any("curl http://dns.httpbin.test/" in h for h in up["try"]), up["try"]
        names = sorted((p["node"], p["name"]) for p in up["processes"])
        for comp in [("portal", "fz-portal"), ("relay-1", "fz-relay"), ("relay-2", "fz-relay"),
                     ("gateway-1", "fz-gateway"), ("gateway-2", "fz-gateway"), ("client", "fz-client"),
                     ("client-2", "fz-client")]:
            assert comp in names, names
        pids = [p["pid"] for p in up["processes"]]

        # The command has returned; the system keeps running.
        (st,) = json.loads(fz("--json", "lab", "status", "--prefix", prefix).stdout)
        assert all(p["alive"] for p in st["processes"]), st["processes"]
        logs = Path(st["log_dir"])
        assert (logs / "client.fz-client.log").stat().st_size > 0
        assert (logs / "portal.fz-portal.log").stat().st_size > 0

        cidr = fz("lab", "exec", "--prefix", prefix, "client", "--", "curl", "-sS", "-m", "15",
                  "http://198.51.100.10/")
        assert (cidr.returncode, cidr.stdout.strip()) == (0, "http"), cidr.stderr
        dns = fz("lab", "exec", "--prefix", prefix, "client", "--", "curl", "-sS", "-m", "15",
                 "http://dns.httpbin.test/")
        assert (dns.returncode, dns.stdout.strip()) == (0, "dns-host"), dns.stderr
        # The wildcard resource covers names the DNS resource does not.
        wild = fz("lab", "exec", "--prefix", prefix, "client", "--", "curl", "-sS", "-m", "15",
                  "http://download.httpbin.test/bytes/100", "-o", "/dev/null", "-w", "%{size_download}")
        assert (wild.returncode, wild.stdout.strip()) == (0, "100"), wild.stderr

        r = fz("lab", "exec", "--prefix", prefix, "client", "--", "fz", "--json", "client", "status")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["user"]["email"] == "alice@acme.test"
        assert status["portal"]["connected"] is True, status["portal"]
        conns = status["connections"]
        assert conns and all(c["state"] == "connected" for c in conns), conns
        assert {x["name"] for x in status["resources"]} == {"resource-net", "dns-host", "httpbin", "Internet"}
        # bob, on client-2, is in no group with a policy: nothing offered, nothing reachable.
        r = fz("lab", "exec", "--prefix", prefix, "client-2", "--", "fz", "--json", "client", "status")
        assert r.returncode == 0, r.stderr
        bob = json.loads(r.stdout)
        assert bob["user"]["email"] == "bob@acme.test" and bob["resources"] == [], bob
        human = fz("lab", "exec", "--prefix", prefix, "client-2", "--", "fz", "client", "status").stdout
        assert "Signed in as bob@acme.test" in human and "Resources: none" in human, human
        r = fz("lab", "exec", "--prefix", prefix, "client-2", "--", "curl", "-sS", "-m", "4", "http://198.51.100.10/")
        assert r.returncode != 0, r.stdout
        # alice turns the Internet resource on: the web sees the gateway site's address.
        r = fz("lab", "exec", "--prefix", prefix, "client", "--", "fz", "client", "internet", "on")
        assert r.returncode == 0 and "Internet resource on" in r.stdout, r.stderr

        def seen_as() -> str:
            return fz("lab", "exec", "--prefix", prefix, "client", "--", "curl", "-sS", "-4", "-m", "5",
                      "http://www.example.test/ip").stdout.strip()

        deadline = time.monotonic() + 20
        while seen_as() != "203.0.113.30" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert seen_as() == "203.0.113.30"

        # Admin commands in the portal node use the lab's admin token.
        r = fz("lab", "exec", "--prefix", prefix, "portal", "--", "fz", "policy", "explain", "--user",
               "bob@acme.test", "--resource", "dns-host")
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    finally:
        down = fz("lab", "down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert lab_namespaces(prefix) == []
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids and not [p for p in pids if pid_alive(p)]
    assert not Path(f"/run/fz-lab/{prefix}").exists()
