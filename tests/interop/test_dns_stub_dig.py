"""The client's DNS stub served by DnsServer, queried with real `dig`, forwarding to real `dnsmasq`.

Everything listens on 127.0.0.0/8 addresses picked per run; the dnsmasq zone is written by the test.
Also: dns_control against temporary resolv.conf files (backup, in-place write, restore, crash).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import dns.flags
import dns.message
import dns.rcode
import pytest

from firezone.proto.dns.stub import DnsStub, DomainResolved
from firezone.runtime import dns_control
from firezone.runtime.dns_listen import DnsServer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

SENTINEL = "100.100.111.1"
# Per-run loopback addresses: 127.<pid-derived>.x.
_NET = f"127.{(os.getpid() % 200) + 20}.{(os.getpid() // 200) % 250}"
STUB_IP = f"{_NET}.1"
UPSTREAM_IP = f"{_NET}.2"
RECORDER_IP = f"{_NET}.3"
BIG_COUNT = 40  # A records of big.zone.test: 40 x 16 bytes > 512, so plain UDP truncates


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        u.bind((host, 0))
        port = u.getsockname()[1]
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port))
        return port


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    exe = shutil.which("dnsmasq")
    assert exe, "dnsmasq is not installed (Debian package dnsmasq-base)"
    conf = tmp_path_factory.mktemp("dnsmasq") / "zone.conf"
    lines = [
        "local=/zone.test/",
        "host-record=www.zone.test,192.0.2.80",
        "host-record=v6.zone.test,2001:db8::80",
        'txt-record=txt.zone.test,"hello from dnsmasq"',
        *[f"host-record=big.zone.test,198.51.100.{i}" for i in range(1, BIG_COUNT + 1)],
        # A name that is also a resource: must never reach the upstream as an A query.
        "host-record=app.corp.test,203.0.113.9",
    ]
    conf.write_text("\n".join(lines) + "\n")
    port = free_port(UPSTREAM_IP)
    proc = subprocess.Popen(
        [exe, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--cache-size=0",
         f"--conf-file={conf}", f"--listen-address={UPSTREAM_IP}", "--bind-interfaces",
         f"--port={port}", "--pid-file=", "--log-queries", "--log-facility=-"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(50):
            if dig(UPSTREAM_IP, port, "www.zone.test", check=False).returncode == 0:
                break
            assert proc.poll() is None, proc.communicate()[0]
            subprocess.run(["sleep", "0.1"], check=True)
        else:
            raise AssertionError("dnsmasq did not answer")
        yield UPSTREAM_IP, port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dig(server: str, port: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("dig")
    assert exe, "dig is not installed (Debian package bind9-dnsutils)"
    p = subprocess.run([exe, f"@{server}", "-p", str(port), "+time=2", "+tries=1", *args],
                       capture_output=True, text=True, timeout=20, check=False)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


async def adig(server: str, port: int, *args: str) -> str:
    p = await asyncio.create_subprocess_exec(
        "dig", f"@{server}", "-p", str(port), "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), 20)
    assert p.returncode == 0, out.decode()
    return out.decode()


def short(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line and not line.startswith(";"))


class Served:
    """A DnsStub behind a DnsServer on STUB_IP, with the given upstream."""

    def __init__(self, upstream: tuple[str, int], search: str | None = "corp.test") -> None:
        self.stub = DnsStub(search_domain=search)
        self.sentinels = self.stub.set_upstreams([upstream])
        self.stub.set_resources([("r-app", "app.corp.test"), ("r-wild", "**.svc.test"),
                                 ("r-one", "*.one.test"), ("r-q", "db?.corp.test")])
        self.server: DnsServer | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self.server = DnsServer(self.stub, asyncio.get_running_loop())
        await self.server.start([(STUB_IP, 0, SENTINEL)])
        self.port = self.server.bound[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def dig(self, *args: str) -> str:
        return await adig(STUB_IP, self.port, *args)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 40))


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_resource_names_answered_with_proxy_ips(dnsmasq, transport):
    async def go() -> None:
        async with Served(dnsmasq) as s:
            out = short(await s.dig(transport, "+short", "app.corp.test", "A"))
            assert out == [f"100.96.0.{i}" for i in range(1, 5)]
            out = short(await s.dig(transport, "+short", "app.corp.test", "AAAA"))
            assert out == [f"fd00:2021:1111:8000::{i}" for i in range(1, 5)]
            full = await s.dig(transport, "app.corp.test", "A")
            assert "app.corp.test.\t\t1\tIN\tA\t100.96.0.1" in full
            assert len(short(await s.dig(transport, "+short", "x.y.svc.test"))) == 4
            assert len(short(await s.dig(transport, "+short", "one.test"))) == 4  # `*` apex
            assert len(short(await s.dig(transport, "+short", "db7.corp.test"))) == 4
            ptr = short(await s.dig(transport, "+short", "-x", "100.96.0.2"))
            assert ptr == ["app.corp.test."]
            ev = s.stub.poll_event()
            assert isinstance(ev, DomainResolved) and ev.domain == "app.corp.test"
            assert "status: NXDOMAIN" in await s.dig(transport, "use-application-dns.net")
    run(go())


def test_search_domain_via_dig(dnsmasq):
    async def go() -> None:
        async with Served(dnsmasq) as s:
            assert short(await s.dig("+short", "app", "A")) == [f"100.96.0.{i}" for i in range(1, 5)]
    run(go())


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_other_names_are_forwarded_to_dnsmasq(dnsmasq, transport):
    async def go() -> None:
        async with Served(dnsmasq) as s:
            assert short(await s.dig(transport, "+short", "www.zone.test")) == ["192.0.2.80"]
            assert short(await s.dig(transport, "+short", "v6.zone.test", "AAAA")) == ["2001:db8::80"]
            assert short(await s.dig(transport, "+short", "txt.zone.test", "TXT")) == [
                '"hello from dnsmasq"']
            assert "status: NXDOMAIN" in await s.dig(transport, "nothing.zone.test")
            # Many concurrent queries over one socket come back to the right askers.
            outs = await asyncio.gather(*(s.dig(transport, "+short", "www.zone.test")
                                          for _ in range(20)))
            assert all(short(o) == ["192.0.2.80"] for o in outs)
    run(go())


def test_truncated_udp_answer_is_passed_through_and_dig_retries_over_tcp(dnsmasq):
    async def go() -> None:
        async with Served(dnsmasq) as s:
            out = await s.dig("+noedns", "+ignore", "big.zone.test", "A")
            assert "flags: qr" in out and " tc" in out.split("flags:")[1].split(";")[0]
            out = await s.dig("+noedns", "big.zone.test", "A")
            assert "Truncated, retrying in TCP mode" in out
            assert len([x for x in short(out) if "\tA\t" in x]) == BIG_COUNT
            # With a large EDNS buffer the same answer fits in one datagram.
            out = await s.dig("+bufsize=4096", "+ignore", "+short", "big.zone.test", "A")
            assert len(short(out)) == BIG_COUNT
    run(go())


class Recorder(asyncio.DatagramProtocol):
    """An upstream that records the exact bytes it receives and answers from dnspython."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q, our_payload=4000)
        self.transport.sendto(r.to_wire(), addr)


def test_edns_buffer_size_and_options_reach_the_upstream_unchanged():
    async def go() -> None:
        rec = Recorder()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: rec, local_addr=(RECORDER_IP, 0))
        try:
            async with Served(transport.get_extra_info("sockname")[:2]) as s:
                out = await s.dig("+bufsize=3000", "+nsid", "+dnssec", "+nocookie", "example.org")
                assert "udp: 4000" in out  # the upstream's EDNS answer comes back unchanged
                assert len(rec.seen) == 1
                q = dns.message.from_wire(rec.seen[0])
                assert q.payload == 3000 and q.ednsflags & dns.flags.DO
                assert [o.otype for o in q.options] == [3]  # NSID
        finally:
            transport.close()
    run(go())


def test_silent_upstream_gets_servfail_after_the_timeout():
    async def go() -> None:
        black = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        black.bind((RECORDER_IP, 0))
        try:
            stub = DnsStub()
            stub.set_upstreams([black.getsockname()])
            server = DnsServer(stub, asyncio.get_running_loop(), timeout=0.5)
            await server.start([(STUB_IP, 0, SENTINEL)])
            try:
                out = await adig(STUB_IP, server.bound[0][1], "+time=4", "example.org")
                assert "status: SERVFAIL" in out
                assert server.counters["upstream_timeout"] == 1
            finally:
                server.close()
        finally:
            black.close()
    run(go())


# --- dns_control ----------------------------------------------------------------------------------------

ORIGINAL = textwrap.dedent("""\
    # the machine's own
    nameserver 192.0.2.53
    nameserver 2001:db8::53
    search lan.example
    options edns0 trust-ad
    """)


@pytest.fixture()
def resolv(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "resolv.conf"
    path.write_text(ORIGINAL)
    return path, tmp_path / "run"


def test_etc_resolv_conf_written_in_place_and_restored(resolv):
    path, state = resolv
    inode = path.stat().st_ino
    assert dns_control.system_upstreams(path, state_dir=state) == [("192.0.2.53", 53),
                                                                  ("2001:db8::53", 53)]
    r = dns_control.apply("etc-resolv-conf", ["100.100.111.1", "fd00:2021:1111:8000:100:100:111:1"],
                          "corp.test", resolv_conf=path, state_dir=state)
    text = path.read_text()
    assert path.stat().st_ino == inode
    assert "nameserver 100.100.111.1\nnameserver fd00:2021:1111:8000:100:100:111:1\n" in text
    assert "search corp.test lan.example\n" in text and "options edns0 trust-ad" in text
    assert "192.0.2.53" not in text
    # While applied, the original upstreams are still what system_upstreams reports.
    assert dns_control.system_upstreams(path, state_dir=state)[0] == ("192.0.2.53", 53)
    r.restore()
    assert path.read_text() == ORIGINAL and path.stat().st_ino == inode
    assert not list(state.iterdir())
    r.restore()  # idempotent
    assert path.read_text() == ORIGINAL


def test_none_mode_changes_nothing(resolv):
    path, state = resolv
    r = dns_control.apply("none", ["100.100.111.1"], "corp.test", resolv_conf=path, state_dir=state)
    assert path.read_text() == ORIGINAL
    r.restore()
    assert path.read_text() == ORIGINAL


def test_unknown_mode_is_an_error(resolv):
    path, state = resolv
    with pytest.raises(ValueError, match="unknown DNS control mode"):
        dns_control.apply("bogus", [], None, resolv_conf=path, state_dir=state)


def test_a_file_changed_by_someone_else_is_left_alone(resolv):
    path, state = resolv
    r = dns_control.apply("etc-resolv-conf", ["100.100.111.1"], None, resolv_conf=path,
                          state_dir=state)
    path.write_text("nameserver 198.51.100.1\n")  # e.g. a DHCP client
    r.restore()
    assert path.read_text() == "nameserver 198.51.100.1\n"
    assert not list(state.iterdir())


_CRASH = textwrap.dedent("""\
    import os, signal, sys, time
    from pathlib import Path
    from firezone.runtime import dns_control
    path, state, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    r = dns_control.apply("etc-resolv-conf", ["100.100.111.1"], "corp.test",
                          resolv_conf=path, state_dir=state)
    if how == "term":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        print("applied", flush=True)
        time.sleep(30)
    finally:
        r.restore()
    """)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_restored_after_sigterm_and_after_a_crash(resolv, how):
    path, state = resolv
    p = subprocess.Popen([sys.executable, "-c", _CRASH, str(path), str(state), how],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "applied"
        assert "100.100.111.1" in path.read_text()
        p.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if how == "term":
        assert path.read_text() == ORIGINAL
        return
    # SIGKILL: our file and the backup are left behind; the next start puts the original back.
    assert "100.100.111.1" in path.read_text() and list(state.iterdir())
    assert dns_control.system_upstreams(path, state_dir=state)[0] == ("192.0.2.53", 53)
    assert dns_control.recover_stale(state_dir=state) is True
    assert path.read_text() == ORIGINAL and not list(state.iterdir())
    assert dns_control.recover_stale(state_dir=state) is False


def test_plain_callable_handler_and_ipv6_listener(dnsmasq):
    """The client role passes ClientState.handle_dns_query; sentinels may be IPv6 addresses."""
    async def go() -> None:
        stub = DnsStub()
        v6_sentinel = stub.set_upstreams([dnsmasq])[1]
        stub.set_resources([("r-app", "app.corp.test")])
        calls: list[tuple[str, bool]] = []

        def handler(data: bytes, *, sentinel: str, tcp: bool, now: float) -> Any:
            calls.append((sentinel, tcp))
            return stub.handle_query(data, sentinel=sentinel, tcp=tcp, now=now)

        server = DnsServer(handler, asyncio.get_running_loop())
        await server.start([("::1", 0, v6_sentinel)])
        try:
            port = server.bound[0][1]
            assert short(await adig("::1", port, "+short", "app.corp.test")) == [
                f"100.96.0.{i}" for i in range(1, 5)]
            assert short(await adig("::1", port, "+tcp", "+short", "www.zone.test")) == [
                "192.0.2.80"]
            assert calls == [(v6_sentinel, False), (v6_sentinel, True)]
        finally:
            server.close()
    run(go())


def test_systemd_resolved_mode_drives_resolvectl_and_reverts(tmp_path, monkeypatch):
    """resolvectl is replaced by a recorder on PATH: the calls are what a real one would get."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "resolvectl"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    state = tmp_path / "run"
    r = dns_control.apply("systemd-resolved", ["100.100.111.1", "fd00:2021:1111:8000:100:100:111:1"],
                          "corp.test", interface="tun-fz", state_dir=state)
    assert log.read_text().splitlines() == [
        "dns tun-fz 100.100.111.1 fd00:2021:1111:8000:100:100:111:1",
        "domain tun-fz ~. corp.test",
        "llmnr tun-fz no",
        "mdns tun-fz no"]
    assert list(state.iterdir())
    r.restore()
    assert log.read_text().splitlines()[-1] == "revert tun-fz"
    assert not list(state.iterdir())
    # A crashed run's link configuration is reverted at the next start.
    dns_control.apply("systemd-resolved", ["100.100.111.1"], None, interface="tun-old",
                      state_dir=state)
    assert dns_control.recover_stale(state_dir=state) is True
    assert log.read_text().splitlines()[-1] == "revert tun-old"
    with pytest.raises(ValueError, match="TUN interface"):
        dns_control.apply("systemd-resolved", ["100.100.111.1"], None, state_dir=state)
