"""``fz gateway up``: the gateway role, assembled from the portal channel, the Node and GatewayState.

Wiring (one uvloop loop):

* :class:`~firezone.runtime.portal_ws.PortalConnection` on ``/gateway`` — ``init`` configures the TUN
  and the relays; ``create_authorization`` adds the authorization to :class:`GatewayState`, creates
  the Node connection (gateway ICE credentials local, client's remote) and answers
  ``authorization_created {ref}``; ``ice_candidates`` / ``reject_access`` / ``resource_updated`` /
  ``relays_presence`` go to the Node or the state;
* :class:`~firezone.runtime.node_driver.NodeDriver` owns the UDP sockets; a decrypted packet is handed
  to ``GatewayState.handle_tunnel_packet`` and written to the TUN only if the state lets it through;
* the TUN reader feeds replies to ``GatewayState.handle_tun_packet`` and encrypts them for the client;
* DNS resources are resolved with the host's resolver (dnspython, 10 s timeout, the state caches 30 s);
* ``table inet firezone`` masquerades the tunnel ranges; it is removed on exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from firezone.proto import phoenix
from firezone.proto.client import _relay_infos
from firezone.proto.gateway import (
    DNS_TIMEOUT,
    AccessExpired,
    ClientAccessEnded,
    ClientInfo,
    FlowStarted,
    GatewayError,
    GatewayState,
)
from firezone.proto.node import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    InvalidateIceCandidate,
    NewIceCandidate,
    Node,
    NodeEvent,
    PathChanged,
)
from firezone.proto.wireguard.keys import b64decode_key, generate_private_key
from firezone.runtime import netlink, nft, tun
from firezone.runtime.driver import DeadlineTimer
from firezone.runtime.node_driver import NodeDriver
from firezone.runtime.portal_ws import PortalConnection
from firezone.runtime.rng import SYSTEM_RNG

log = logging.getLogger(__name__)

TUN_NAME = "tun-firezone"
DEFAULT_TOKEN_FILE = Path("/etc/firezone/gateway.token")
TUN_TXQUEUELEN = 3000
BATCH = 128
# firezone-notes §1.2: the ranges routed into the TUN (clients' tunnel addresses).
TUNNEL_ROUTES = ("100.64.0.0/11", "fd00:2021:1111::/107")


class GatewayFailure(RuntimeError):
    """The gateway cannot run (refused by the portal, no TUN, nft failed); one line for the user."""


def outbound_ip(host: str, family: int) -> str | None:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, 9, af, socket.SOCK_DGRAM)
    except OSError:
        return None
    for info in infos:
        with socket.socket(af, socket.SOCK_DGRAM) as s:
            try:
                s.connect(info[4])
                return str(s.getsockname()[0])
            except OSError:
                continue
    return None


def local_ips_towards(portal: str) -> list[str]:
    """Host candidates: the addresses this host uses towards the portal (IPv4, then IPv6)."""
    host = urlsplit(portal if "://" in portal else f"http://{portal}").hostname or portal
    out = [ip for ip in (outbound_ip(host, 4), outbound_ip(host, 6)) if ip]
    if not out:
        fallback = outbound_ip("203.0.113.1", 4)
        if fallback:
            out.append(fallback)
    return out


def enable_forwarding() -> None:
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        try:
            Path(path).write_text("1\n")
        except OSError as e:
            log.warning("cannot enable IP forwarding", extra={"path": path, "error": e.strerror})


async def resolve(domain: str, timeout: float = DNS_TIMEOUT) -> list[str] | None:
    """A and AAAA of ``domain`` with the host's resolver; None when nothing resolved."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = timeout
    out: list[str] = []

    async def one(rtype: str) -> None:
        try:
            ans = await resolver.resolve(domain, rtype, search=False)
        except (dns.exception.DNSException, OSError):
            return
        out.extend(r.address for r in ans)

    await asyncio.gather(one("A"), one("AAAA"))
    return out or None


class GatewayRole:
    """One gateway process: portal channel + Node + GatewayState + TUN + nftables."""

    def __init__(self, portal: str, token: str, *, external_id: str, name: str,
                 tun_name: str = TUN_NAME, port: int = 52625, local_ips: list[str] | None = None,
                 manage_nft: bool = True) -> None:
        self.portal = portal
        self.token = token
        self.tun_name = tun_name
        self.port = port
        self.local_ips = local_ips or local_ips_towards(portal)
        self.manage_nft = manage_nft
        self._private = generate_private_key(SYSTEM_RNG)
        self.external_id = external_id
        self.name = name
        self.node: Node | None = None
        self.state: GatewayState | None = None
        self.driver: NodeDriver | None = None
        self.conn: PortalConnection | None = None
        self.tun_fd: int | None = None
        self._timer: DeadlineTimer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._configured: tuple[str | None, str | None] | None = None
        self._stop = asyncio.Event()
        self._stop_reason: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._nft_applied = False
        self._relays: list[tuple[str, Any]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> str:
        """Run until SIGINT/SIGTERM or the portal stops us; returns why it stopped."""
        loop = self._loop = asyncio.get_running_loop()
        if not self.local_ips:
            raise GatewayFailure("no local IP address found towards the portal")
        now = loop.time()
        self.node = Node(private_key=self._private, rng=SYSTEM_RNG, now=now, unix_time=time.time(),
                         is_client=False)
        self.state = GatewayState(now=now, unix_time=time.time(), rng=SYSTEM_RNG)
        try:
            self.tun_fd, self.tun_name = tun.open_tun(self.tun_name)
        except tun.TunError as e:
            raise GatewayFailure(f"cannot create the TUN device {self.tun_name}: {e.strerror or e}") from None
        try:
            enable_forwarding()
            if self.manage_nft:
                try:
                    nft.apply(nft.render(self.tun_name))
                except nft.NftError as e:
                    raise GatewayFailure(str(e)) from None
                self._nft_applied = True
            self.driver = NodeDriver(self.node, tun_fd=None, local_ips=self.local_ips, route=lambda _p: None,
                                     on_event=self._on_node_event, port=self.port,
                                     on_tun_write=self._from_client)
            self.driver.start()
            self._timer = DeadlineTimer(loop, self._on_timer)
            loop.add_reader(self.tun_fd, self._on_tun_readable)
            public_key = base64.b64encode(self.node.public_key).decode()
            self.conn = PortalConnection(self.portal, "/gateway", self.token, topic="gateway",
                                         params={"external_id": self.external_id, "public_key": public_key,
                                                 "name": self.name},
                                         component="fz-gateway")
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(s, self.stop, f"signal {signal.Signals(s).name}")
            portal_task = asyncio.create_task(self.conn.run(self._on_portal_event))
            stop_task = asyncio.create_task(self._stop.wait())
            log.info("gateway starting", extra={"portal": self.portal, "local_ips": self.local_ips})
            done, _ = await asyncio.wait({portal_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if portal_task in done:
                reason = portal_task.result()
                stop_task.cancel()
                if self._stop_reason is None:
                    raise GatewayFailure(f"the portal ended the session: {reason}")
                return self._stop_reason
            self.conn.stop(self._stop_reason or "stopped")
            try:
                await asyncio.wait_for(portal_task, 5.0)
            except (TimeoutError, asyncio.CancelledError):
                portal_task.cancel()
            return self._stop_reason or "stopped"
        finally:
            await self._close()

    def stop(self, reason: str = "stopped") -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            log.info("gateway stopping", extra={"reason": reason})
        self._stop.set()

    async def _close(self) -> None:
        loop = self._loop
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(s)  # type: ignore[union-attr]
        for t in list(self._tasks):
            t.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.driver is not None:
            self.driver.close()
        if self.tun_fd is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.tun_fd)  # type: ignore[union-attr]
            os.close(self.tun_fd)
            self.tun_fd = None
        if self._nft_applied:
            try:
                nft.remove()
            except nft.NftError as e:
                log.warning("cannot remove the nftables table", extra={"error": str(e)})
            self._nft_applied = False

    # -- portal ----------------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _on_portal_event(self, ev: phoenix.ChannelEvent) -> None:
        if isinstance(ev, phoenix.Message):
            try:
                await self._on_message(ev.event, ev.payload)
            except (KeyError, TypeError, ValueError, GatewayError) as e:
                log.warning("malformed portal message ignored", extra={"event": ev.event, "error": str(e)})
            self._pump()
        elif isinstance(ev, phoenix.Reply) and not ev.ok:
            log.warning("the portal refused a message", extra={"response": ev.response})
        elif isinstance(ev, phoenix.Stopped):
            log.warning("the portal ended the session", extra={"reason": ev.reason})

    async def _on_message(self, event: str, payload: Any) -> None:
        assert self.node is not None and self.state is not None and self.driver is not None
        now = self._now()
        if event == "init":
            iface = payload.get("interface") or {}
            await self._configure_tun(iface.get("ipv4"), iface.get("ipv6"))
            self._relays = _relay_infos(payload.get("relays"))
            self.node.update_relays([i for _, i in self._relays], now)
            log.info("gateway ready", extra={"ipv4": iface.get("ipv4"), "ipv6": iface.get("ipv6"),
                                             "relays": len(payload.get("relays") or [])})
        elif event == "relays_presence":
            self._relays_presence(payload, now)
        elif event in ("create_authorization", "authorize_flow"):
            self._create_authorization(payload, now)
        elif event in ("ice_candidates", "invalidate_ice_candidates"):
            cid = str(payload["client_id"])
            for c in payload.get("candidates") or []:
                if event == "ice_candidates":
                    self.node.add_remote_candidate(cid, str(c), now)
                else:
                    self.node.remove_remote_candidate(cid, str(c), now)
        elif event == "reject_access":
            cid, rid = str(payload["client_id"]), str(payload["resource_id"])
            log.info("access revoked", extra={"client_id": cid, "resource_id": rid})
            self.state.remove_authorization(cid, rid, now)
        elif event == "resource_updated":
            self.state.update_resource(payload, now)
        else:
            log.debug("portal event ignored", extra={"event": event})
        self.driver.wake()

    def _relays_presence(self, payload: dict[str, Any], now: float) -> None:
        assert self.node is not None
        fresh = _relay_infos(payload.get("connected"))
        # One relay may come once per address family under one id: replace all of its entries.
        drop = {str(r) for r in payload.get("disconnected_ids") or []} | {rid for rid, _ in fresh}
        self._relays = [(rid, i) for rid, i in self._relays if rid not in drop] + fresh
        self.node.update_relays([i for _, i in self._relays], now)

    def _create_authorization(self, p: dict[str, Any], now: float) -> None:
        assert self.node is not None and self.state is not None and self.conn is not None
        client = p["client"]
        info = ClientInfo.from_payload(client, p.get("subject"))
        exp = p.get("expires_at")
        self.state.add_authorization(info, p["resource"], float(exp) if exp else None, now)
        psk_text = p.get("preshared_key") or client.get("preshared_key")
        cice, gice = p["client_ice_credentials"], p["gateway_ice_credentials"]
        self.node.upsert_connection(
            info.id, peer_public_key=b64decode_key(str(client["public_key"])),
            preshared_key=b64decode_key(str(psk_text)) if psk_text else None,
            local_creds=(str(gice["username"]), str(gice["password"])),
            remote_creds=(str(cice["username"]), str(cice["password"])), now=now)
        self.conn.send("authorization_created", {"ref": p["ref"]})
        log.info("access granted", extra={"client_id": info.id, "user": info.user,
                                          "resource_id": p["resource"].get("id")})

    async def _configure_tun(self, ipv4: str | None, ipv6: str | None) -> None:
        if self._configured == (ipv4, ipv6):
            return
        addrs: list[Any] = []
        if ipv4:
            addrs.append(ipaddress.ip_interface(f"{ipv4}/32"))
        if ipv6:
            addrs.append(ipaddress.ip_interface(f"{ipv6}/128"))
        routes = [ipaddress.ip_network(r) for r in TUNNEL_ROUTES]
        await netlink.aconfigure_interface(self.tun_name, mtu=tun.DEFAULT_MTU, addresses=addrs, routes=routes,
                                           txqueuelen=TUN_TXQUEUELEN)
        self._configured = (ipv4, ipv6)

    # -- node ------------------------------------------------------------------------------------

    def _on_node_event(self, ev: NodeEvent) -> None:
        assert self.conn is not None and self.state is not None
        match ev:
            case NewIceCandidate(peer_id=pid, sdp=sdp):
                self.conn.send("new_ice_candidates", {"client_ids": [pid], "candidates": [sdp]})
            case InvalidateIceCandidate(peer_id=pid, sdp=sdp):
                self.conn.send("invalidate_ice_candidates", {"client_ids": [pid], "candidates": [sdp]})
            case ConnectionEstablished(peer_id=pid, path=path, rtt=rtt):
                log.info("client connected", extra={"client_id": pid, "path": path,
                                                    "rtt_ms": None if rtt is None else round(rtt * 1000, 2)})
            case PathChanged(peer_id=pid, path=path):
                log.info("client path changed", extra={"client_id": pid, "path": path})
            case ConnectionFailed(peer_id=pid, reason=reason):
                log.info("client connection failed", extra={"client_id": pid, "reason": reason})
                self.state.remove_client(pid, self._now())
            case ConnectionClosed(peer_id=pid):
                log.debug("client connection closed", extra={"client_id": pid})

    def _from_client(self, client_id: str, packet: bytes) -> None:
        assert self.state is not None
        out = self.state.handle_tunnel_packet(client_id, packet, self._now())
        if out is not None and self.tun_fd is not None:
            try:
                os.write(self.tun_fd, out)
            except OSError:
                self.state.counters["tun_write_failed"] = self.state.counters.get("tun_write_failed", 0) + 1
        self._pump()

    def _on_tun_readable(self) -> None:
        assert self.state is not None and self.node is not None and self.driver is not None
        now = self._now()
        udp = self.driver.udp
        for _ in range(BATCH):
            try:
                pkt = os.read(self.tun_fd, 65535)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                break
            got = self.state.handle_tun_packet(pkt, now)
            if got is None:
                continue
            t = self.node.encapsulate(got[0], got[1], now)
            if t is not None and udp is not None:
                udp.sendto(t.payload, t.dst)
        self._pump()
        self.driver.wake()

    # -- gateway state ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Drain GatewayState's outputs and re-arm its timer."""
        st, node, driver = self.state, self.node, self.driver
        assert st is not None and node is not None and driver is not None
        now = self._now()
        udp = driver.udp
        while (tp := st.poll_tunnel_packet()) is not None:
            t = node.encapsulate(tp[0], tp[1], now)
            if t is not None and udp is not None:
                udp.sendto(t.payload, t.dst)
        while (q := st.poll_dns_query()) is not None:
            task = asyncio.create_task(self._resolve(q.id, q.domain))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while (ev := st.poll_event()) is not None:
            if isinstance(ev, ClientAccessEnded):
                log.debug("client has no access left; closing its connection", extra={"client_id": ev.client_id})
                node.remove_connection(ev.client_id, now)
                st.remove_client(ev.client_id, now)
            elif isinstance(ev, AccessExpired):
                log.info("authorization expired", extra={"client_id": ev.client_id,
                                                         "resource_id": ev.resource_id})
            elif isinstance(ev, FlowStarted):
                log.debug("flow started", extra={"client_id": ev.client_id, "resource_id": ev.resource_id,
                                                 "protocol": ev.protocol, "dst": ev.real_dst_ip,
                                                 "dst_port": ev.dst_port})
        if self._timer is not None:
            self._timer.update(st.poll_timeout())

    def _on_timer(self) -> None:
        assert self.state is not None and self.driver is not None
        self.state.handle_timeout(self._now())
        self._pump()
        self.driver.wake()

    async def _resolve(self, qid: int, domain: str) -> None:
        addrs = await resolve(domain)
        if self.state is None:
            return
        log.debug("resolved", extra={"domain": domain, "addresses": addrs})
        self.state.handle_dns_result(qid, addrs, None, self._now())
        self._pump()
        if self.driver is not None:
            self.driver.wake()
