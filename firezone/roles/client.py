"""``fz client up``: the client role, assembled from the portal channel, ClientState, TUN, DNS and sockets.

Wiring (one uvloop loop), every decision being :class:`~firezone.proto.client.ClientState`'s:

* :class:`~firezone.runtime.portal_ws.PortalConnection` on ``/client``: pushes go to
  ``handle_portal_message``; ``poll_portal_message`` output (``request_authorization``, candidates)
  goes back; SIGHUP reconnects;
* the TUN ``tun-firezone``: packets read go to ``handle_tun_packet``; ``poll_tun_packet`` is written;
  ``TunInterfaceUpdated`` sets addresses (tunnel IPs and the DNS sentinels), routes and DNS control;
* one UDP socket per family (:class:`~firezone.runtime.udp.UdpSockets`): datagrams go to
  ``handle_datagram``; ``poll_transmit`` is sent;
* :class:`~firezone.runtime.dns_listen.DnsServer` on the sentinel addresses (UDP and TCP) answers
  through ``handle_dns_query``;
* one timer follows ``poll_timeout``; the control socket answers ``fz client status``;
* :class:`~firezone.runtime.netwatch.NetWatcher` reports address and default-route changes
  (not those of the TUN or loopback), debounced. The client then finds its local addresses again,
  resets ClientState (every gateway connection and relay allocation afresh, from the new address;
  what was in use is authorized again at once) and reconnects the portal. Flows inside the tunnel
  use the tunnel IPs, which do not change, so they survive the move.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from firezone.proto import phoenix
from firezone.proto.client import (
    INTERNET_ROUTES,
    AccessDenied,
    ClientState,
    ConnectionDown,
    ConnectionPathChanged,
    ConnectionUp,
    GatewaySilent,
    PortalDisconnect,
    ResourcesChanged,
    TunInterfaceUpdated,
)
from firezone.proto.dns.stub import StubResult
from firezone.proto.wireguard.keys import generate_private_key
from firezone.roles.gateway import local_ips_towards
from firezone.runtime import dns_control, full_tunnel, netlink, tun
from firezone.runtime.control_socket import ControlServer
from firezone.runtime.dns_listen import DnsServer
from firezone.runtime.driver import DeadlineTimer
from firezone.runtime.netwatch import NetWatcher
from firezone.runtime.portal_ws import PortalConnection
from firezone.runtime.rng import SYSTEM_RNG
from firezone.runtime.udp import UdpSockets

log = logging.getLogger(__name__)

TUN_NAME = "tun-firezone"
TUN_TXQUEUELEN = 3000
BATCH = 128
RECV_SIZE = 65535


class ClientFailure(RuntimeError):
    """The client cannot run or was stopped by the portal; one line for the user."""


def _delete_routes(name: str, routes: list[str]) -> None:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return
        for r in routes:
            net = ipaddress.ip_network(r)
            try:
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx[0],
                          family=10 if net.version == 6 else 2)
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise


def _add_sentinel_addresses(name: str, addresses: list[str]) -> None:
    """Add the DNS sentinels to the TUN so the listeners can bind them.

    IPv6 ones are added deprecated (preferred lifetime 0): RFC 6724 source selection then never
    picks a sentinel as the source of traffic into the tunnel. IPv4 has no such mark; there the
    tunnel address, added first, is the one the kernel picks.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise netlink.NetlinkFailure(errno.ENODEV, f"no such interface: {name}")
        for a in addresses:
            iface = ipaddress.ip_interface(a)
            kw: dict[str, Any] = {}
            if iface.version == 6:
                kw = {"preferred": 0, "valid": 0xFFFFFFFF}
            try:
                ipr.addr("add", index=idx[0], address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise netlink.NetlinkFailure(e.code, f"adding {a} to {name}: {e}") from None


class ClientRole:
    """One ``fz client up`` process."""

    def __init__(self, portal: str, token: str, *, external_id: str, name: str, dns_control_mode: str,
                 tun_name: str = TUN_NAME, port: int = 0, local_ips: list[str] | None = None,
                 control_path: Path | None = None, sign_in: dict[str, Any] | None = None,
                 roam_detect: bool = True, internet: bool = False) -> None:
        self.portal = portal
        self.token = token
        self.external_id = external_id
        self.name = name
        self.dns_mode = dns_control_mode
        self.tun_name = tun_name
        self.port = port
        self._local_ips_given = bool(local_ips)
        self.local_ips = local_ips or local_ips_towards(portal)
        self.roam_detect = roam_detect
        self.internet = internet  # the Internet resource's start state (off unless asked)
        self._full_tunnel = False
        self.netwatch: NetWatcher | None = None
        self.network_changes = 0
        self._roam_task: asyncio.Task[None] | None = None
        self.control_path = control_path
        self.sign_in = sign_in or {}
        self.state: ClientState | None = None
        self.conn: PortalConnection | None = None
        self.udp: UdpSockets | None = None
        self.tun_fd: int | None = None
        self.dns: DnsServer | None = None
        self.control: ControlServer | None = None
        self._restorer: dns_control.Restorer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: DeadlineTimer | None = None
        self._local: dict[int, tuple[str, int]] = {}
        self._routes: set[str] = set()
        self._addresses: set[str] = set()
        self._dns_bound: set[str] = set()
        self._dns_applied: tuple[tuple[str, ...], str | None] | None = None
        self._iface_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._stop_reason: str | None = None
        self._failure: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._readers: list[int] = []
        self._udp_readers: set[int] = set()
        self.joined_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> str:
        loop = self._loop = asyncio.get_running_loop()
        if not self.local_ips:
            raise ClientFailure("no local IP address found towards the portal")
        now = loop.time()
        self.state = ClientState(private_key=generate_private_key(SYSTEM_RNG), rng=SYSTEM_RNG, now=now,
                                 unix_time=time.time())
        if self.internet:
            self.state.set_internet_resource_enabled(True, now)
        if await asyncio.to_thread(full_tunnel.disable):
            log.info("removed the full-tunnel routing rules a previous run left behind")
        try:
            self.tun_fd, self.tun_name = tun.open_tun(self.tun_name)
        except tun.TunError as e:
            raise ClientFailure(f"cannot create the TUN device {self.tun_name}: {e.strerror or e}") from None
        try:
            if self.dns_mode != "none":
                upstreams = dns_control.system_upstreams(mode=self.dns_mode)
                self.state.set_system_upstreams(upstreams, loop.time())
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{self.tun_name}/accept_dad").write_text("0\n")
            # fz's own sockets carry its firewall mark: with the Internet resource on they must
            # not be routed into the tunnel they carry.
            self.udp = UdpSockets(self.port, mark=True)
            self._timer = DeadlineTimer(loop, self._on_timer)
            loop.add_reader(self.tun_fd, self._on_tun_readable)
            self._readers.append(self.tun_fd)
            for addr in self._use_local_ips():
                self.state.add_local_interface(addr, loop.time())
            self.dns = DnsServer(self._dns_query, loop, mark=True)
            if self.control_path is not None:
                self.control = ControlServer(self.control_path, self._control)
                await self.control.start()
            public_key = base64.b64encode(self.state.public_key).decode()
            self.conn = PortalConnection(self.portal, "/client", self.token, topic="client",
                                         params={"external_id": self.external_id, "public_key": public_key,
                                                 "name": self.name},
                                         component="fz-client", mark=True)
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(s, self.stop, f"signal {signal.Signals(s).name}")
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            if self.roam_detect:
                watcher = NetWatcher(self._on_network_change, ignore=("lo", self.tun_name))
                try:
                    await watcher.start()
                except OSError as e:
                    log.warning("cannot watch for network changes", extra={"error": str(e)})
                else:
                    self.netwatch = watcher
            portal_task = asyncio.create_task(self.conn.run(self._on_portal_event))
            stop_task = asyncio.create_task(self._stop.wait())
            log.info("client starting", extra={"portal": self.portal, "local_ips": self.local_ips})
            self._pump()
            done, _ = await asyncio.wait({portal_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if portal_task in done:
                reason = portal_task.result()
                stop_task.cancel()
                raise ClientFailure(self._failure or f"the portal ended the session: {reason}")
            self.conn.stop(self._stop_reason or "stopped")
            try:
                await asyncio.wait_for(portal_task, 5.0)
            except (TimeoutError, asyncio.CancelledError):
                portal_task.cancel()
            if self._failure is not None:
                raise ClientFailure(self._failure)
            return self._stop_reason or "stopped"
        finally:
            await self._close()

    def stop(self, reason: str = "stopped") -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            log.info("client stopping", extra={"reason": reason})
        self._stop.set()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reconnecting to the portal")
        if self.conn is not None:
            self.conn.reconnect("SIGHUP")

    def _use_local_ips(self) -> list[tuple[str, int]]:
        """Socket bases for ``self.local_ips`` (one per family with a socket); reads their sockets."""
        assert self.udp is not None and self._loop is not None
        self._local.clear()
        for sock in self.udp.sockets():
            fam = 6 if ":" in sock.getsockname()[0] else 4
            ip = next((i for i in self.local_ips if (6 if ":" in i else 4) == fam), None)
            if ip is None:
                continue
            self._local[fam] = (ip, self.udp.port)
            if sock.fileno() not in self._udp_readers:
                self._loop.add_reader(sock.fileno(), self._on_udp_readable, sock, fam)
                self._readers.append(sock.fileno())
                self._udp_readers.add(sock.fileno())
        return list(self._local.values())

    def _on_network_change(self) -> None:
        """Addresses or default routes changed: new local addresses, fresh connections, new portal session."""
        if self.state is None or self._stop.is_set():
            return
        self.network_changes += 1
        log.info("network changed: reconnecting")
        if self._roam_task is not None:
            self._roam_task.cancel()
        self._roam_task = asyncio.create_task(self._roam())

    async def _roam(self) -> None:
        assert self.state is not None
        if not self._local_ips_given:
            # In a thread: a portal host name is resolved through our own DNS stub, which this
            # loop serves.
            self.local_ips = await asyncio.to_thread(local_ips_towards, self.portal)
        addrs = self._use_local_ips()
        log.debug("local addresses", extra={"local_ips": self.local_ips})
        if not addrs:
            log.info("no local address towards the portal; waiting for the network")
        self.state.reset(self._now(), addrs)
        if self.conn is not None:
            self.conn.reconnect("network changed")
        self._pump()

    async def _close(self) -> None:
        loop = self._loop
        assert loop is not None
        if self.netwatch is not None:
            self.netwatch.close()
        if self._roam_task is not None:
            self._roam_task.cancel()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(s)
        for t in list(self._tasks):
            t.cancel()
        for fd in self._readers:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
        if self.control is not None:
            self.control.close()
        if self.dns is not None:
            self.dns.close()
        if self._restorer is not None:
            try:
                self._restorer.restore()
            except (OSError, RuntimeError) as e:
                log.warning("cannot restore the DNS configuration", extra={"error": str(e)})
        if self._full_tunnel:
            try:
                await asyncio.to_thread(full_tunnel.disable)
            except (OSError, full_tunnel.FullTunnelError) as e:
                log.warning("cannot remove the full-tunnel routing rules", extra={"error": str(e)})
        if self.udp is not None:
            self.udp.close()
        if self.tun_fd is not None:
            os.close(self.tun_fd)  # the kernel removes the interface with its addresses and routes
            self.tun_fd = None

    # -- portal ----------------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_portal_event(self, ev: phoenix.ChannelEvent) -> None:
        assert self.state is not None
        if isinstance(ev, phoenix.Message):
            self.state.handle_portal_message(ev.event, ev.payload, self._now())
            if ev.event == "init":
                self.joined_at = time.time()
            self._pump()
        elif isinstance(ev, phoenix.Reply) and not ev.ok:
            log.warning("the portal refused a message", extra={"response": ev.response})
        elif isinstance(ev, phoenix.Stopped) and self._stop_reason is None and self._failure is None:
            self._failure = f"the portal ended the session: {ev.reason}"

    # -- I/O -------------------------------------------------------------------------------------

    def _on_tun_readable(self) -> None:
        st = self.state
        assert st is not None
        now = self._now()
        for _ in range(BATCH):
            try:
                pkt = os.read(self.tun_fd, RECV_SIZE)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                break
            st.handle_tun_packet(pkt, now)
        self._pump()

    def _on_udp_readable(self, sock: Any, fam: int) -> None:
        st = self.state
        assert st is not None
        now = self._now()
        local = self._local.get(fam)
        for _ in range(BATCH):
            try:
                data, src = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error queued by an earlier send
            if local is None:
                continue  # the family has no address towards the portal any more
            st.handle_datagram(local, (src[0], src[1]), data, now)
        self._pump()

    def _dns_query(self, data: bytes, *, sentinel: str, tcp: bool, now: float) -> StubResult:
        assert self.state is not None and self._loop is not None
        result = self.state.handle_dns_query(data, sentinel=sentinel, tcp=tcp, now=now)
        self._loop.call_soon(self._pump)
        return result

    def _on_timer(self) -> None:
        assert self.state is not None
        self.state.handle_timeout(self._now())
        self._pump()

    def _pump(self) -> None:
        """Drain every ClientState output and re-arm the timer."""
        st = self.state
        if st is None:
            return
        udp = self.udp
        fd = self.tun_fd
        while True:
            progressed = False
            while (t := st.poll_transmit()) is not None:
                progressed = True
                if udp is not None:
                    udp.sendto(t.payload, t.dst)
            while (p := st.poll_tun_packet()) is not None:
                progressed = True
                if fd is not None:
                    try:
                        os.write(fd, p)
                    except OSError:
                        pass
            while (m := st.poll_portal_message()) is not None:
                progressed = True
                if self.conn is not None:
                    self.conn.send(m[0], m[1])
            while (ev := st.poll_event()) is not None:
                progressed = True
                self._on_client_event(ev)
            if not progressed:
                break
        if self._timer is not None:
            self._timer.update(st.poll_timeout())

    def _on_client_event(self, ev: Any) -> None:
        match ev:
            case TunInterfaceUpdated():
                self._spawn(self._apply_interface(ev))
            case ResourcesChanged(resources=res):
                log.info("resources updated", extra={"count": len(res)})
            case AccessDenied(resource_id=rid, reason=reason, violated_properties=violated):
                log.warning("access denied", extra={"resource_id": rid, "reason": reason,
                                                    "violated_properties": list(violated)})
            case ConnectionUp(gateway_id=gid, path=path, rtt=rtt):
                log.info("connected to gateway", extra={"gateway_id": gid, "path": path,
                                                        "rtt_ms": None if rtt is None else round(rtt * 1000, 2)})
            case ConnectionPathChanged(gateway_id=gid, path=path):
                log.info("gateway path changed", extra={"gateway_id": gid, "path": path})
            case ConnectionDown(gateway_id=gid, reason=reason):
                log.info("gateway connection closed", extra={"gateway_id": gid, "reason": reason})
            case GatewaySilent(gateway_id=gid):
                log.warning("gateway stopped answering; asking for another", extra={"gateway_id": gid})
            case PortalDisconnect(reason=reason):
                self._failure = f"the portal ended the session: {reason}"
                log.warning("the portal ended the session", extra={"reason": reason})
                self.stop(reason)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failure = f"cannot configure the tunnel interface: {exc}"
            log.error("cannot configure the tunnel interface", extra={"error": str(exc)})
            self.stop("interface configuration failed")

    async def _apply_interface(self, ev: TunInterfaceUpdated) -> None:
        async with self._iface_lock:
            # The tunnel addresses go first: with only /32 and /128 addresses on the device the
            # kernel picks the first one as the source of traffic routed into the TUN, and that
            # must never be a DNS sentinel (the gateway only accepts the client's tunnel IPs).
            ordered: list[str] = []
            if ev.ipv4:
                ordered.append(f"{ev.ipv4}/32")
            if ev.ipv6:
                ordered.append(f"{ev.ipv6}/128")
            sentinels = [f"{s}/{128 if ':' in s else 32}" for s in ev.dns_sentinels]
            addrs = set(ordered) | set(sentinels)
            # The Internet resource's default routes go to a table of their own (full_tunnel).
            full = any(r in INTERNET_ROUTES for r in ev.routes)
            routes = set(ev.routes) - set(INTERNET_ROUTES)
            gone = sorted(self._routes - routes)
            await netlink.aconfigure_interface(
                self.tun_name, mtu=tun.DEFAULT_MTU, txqueuelen=TUN_TXQUEUELEN,
                addresses=[ipaddress.ip_interface(a) for a in ordered if a not in self._addresses],
                routes=[ipaddress.ip_network(r) for r in sorted(routes - self._routes)])
            fresh_sentinels = [a for a in sentinels if a not in self._addresses]
            if fresh_sentinels:
                await asyncio.to_thread(_add_sentinel_addresses, self.tun_name, fresh_sentinels)
            if gone:
                await asyncio.to_thread(_delete_routes, self.tun_name, gone)
            self._addresses |= addrs
            self._routes = routes
            if full != self._full_tunnel:
                if full:
                    await asyncio.to_thread(full_tunnel.enable, self.tun_name, ipv6=bool(ev.ipv6))
                else:
                    await asyncio.to_thread(full_tunnel.disable)
                self._full_tunnel = full
                log.info("Internet resource " + ("routed through the tunnel" if full else "off"))
            log.debug("tunnel interface configured", extra={"routes": sorted(routes)})
            for sentinel in [s for s in ev.dns_sentinels if s not in self._dns_bound]:
                await self._listen_dns(sentinel)
            want = (tuple(ev.dns_sentinels), ev.search_domain)
            if self.dns_mode != "none" and ev.dns_sentinels and want != self._dns_applied:
                if self._restorer is not None:
                    self._restorer.restore()
                self._restorer = await asyncio.to_thread(dns_control.apply, self.dns_mode, list(ev.dns_sentinels),
                                                         ev.search_domain, interface=self.tun_name)
                self._dns_applied = want
                log.info("DNS points at the tunnel", extra={"mode": self.dns_mode,
                                                            "sentinels": list(ev.dns_sentinels)})

    async def _listen_dns(self, sentinel: str) -> None:
        # A fresh IPv6 address may not be bindable for a moment (the kernel finishes setting it up
        # asynchronously); retry briefly before giving up.
        assert self.dns is not None
        for attempt in range(50):
            try:
                await self.dns.start([sentinel])
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
            else:
                self._dns_bound.add(sentinel)
                return

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.state is not None
        st = self.state.status()
        user = {k: self.sign_in.get(k) for k in ("actor_name", "actor_email", "account") if self.sign_in.get(k)}
        st["user"] = {"name": user.get("actor_name"), "email": user.get("actor_email"),
                      "account": user.get("account"), "source": self.sign_in.get("source")}
        st["portal"] = {"url": self.portal, "connected": bool(self.conn and self.conn.joined)}
        st["network_changes"] = self.network_changes
        sites = {}
        for r in st["resources"]:
            if r["site"].get("id"):
                sites[r["site"]["id"]] = r["site"].get("name")
        for c in st["connections"]:
            c["site_name"] = sites.get(c.get("site_id"))
        return st

    def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "resources":
            return {"resources": self.status()["resources"]}
        if cmd == "internet":
            on = req.get("on")
            if on is not None:
                if not isinstance(on, bool):
                    return {"error": "'on' must be true or false"}
                assert self.state is not None
                self.state.set_internet_resource_enabled(on, self._now())
                self._pump()
            st = self.status()
            offered = any(r["type"] == "internet" for r in st["resources"])
            return {"enabled": st["internet_resource_enabled"], "offered": offered}
        return {"error": f"unknown command {cmd!r}"}
