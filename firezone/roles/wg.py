"""``fz wg up``: a standalone userspace WireGuard interface (TUN + one UDP port + the engine).

Lifecycle: resolve peer endpoints, build the :class:`firezone.proto.wireguard.Device`, create the
TUN device and configure it through netlink, bind the UDP sockets, serve the UAPI socket, then run
until SIGINT/SIGTERM and remove the interface.

Data path: the TUN fd and each UDP socket are registered with ``loop.add_reader``; on every
readiness event the handler drains up to ``BATCH`` reads without blocking and feeds each packet
to the engine. Decrypted packets are written to the TUN at once; datagrams for the network are
collected by a :class:`~firezone.runtime.udp.SendBatcher` and leave at the end of the batch, runs
of equal size to one peer as a single UDP GSO ``sendmsg``. With GRO on the sockets one
``recvmsg`` likewise returns a run of datagrams. A full kernel buffer drops the packet, as a NIC
would. The engine's timer is re-armed once per batch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from firezone.logs import TRACE
from firezone.proto.wireguard import ConnectionExpired, Device, HandshakeCompleted, public_key
from firezone.runtime import netlink, tun
from firezone.runtime.driver import DeadlineTimer, wait_for_signals
from firezone.runtime.rng import SYSTEM_RNG
from firezone.runtime.tun_offload import VNET_HDR_LEN, coalesce
from firezone.runtime.udp import SendBatcher, UdpSockets, recv_segments
from firezone.runtime.wg_uapi import RUN_DIR, InterfaceInfo, PeerInfo, UapiServer
from firezone.wgconf import IPNetwork, WgConfig

log = logging.getLogger(__name__)

# Packets handled per readiness event before yielding to the other fds and timers.
BATCH = 128
# Large enough for any WireGuard datagram a peer with a jumbo MTU could send.
RECV_SIZE = 65535
# The kernel's default of 500 packets overflows under a TCP burst while this single thread is busy
# with the other direction; every overflow is a TCP retransmit. 1000 still lost thousands of
# packets per 6 s iperf3 run on 2 cores, 3000 none (bench/wg_throughput); at 600 Mbit/s a full
# queue is ~60 ms of extra latency.
TUN_TXQUEUELEN = 3000


class WgSetupError(RuntimeError):
    """The interface could not be brought up; the message is for the user."""


@dataclass
class Stats:
    tun_rx: int = 0
    tun_tx_drop: int = 0
    udp_tx_drop: int = 0
    udp_rx_datagrams: int = 0


def resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    """Resolve a config endpoint (address or name) to one (ip, port), preferring IPv4."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return host, port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise WgSetupError(f"cannot resolve endpoint {host}: {e.strerror}") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


def routes_for(cfg: WgConfig) -> list[IPNetwork]:
    """AllowedIPs to route into the interface; default routes are left out (they need policy
    routing so the tunnel's own UDP does not loop into it, which ``fz wg up`` does not do)."""
    out: list[IPNetwork] = []
    seen: set[IPNetwork] = set()
    for p in cfg.peers:
        for net in p.allowed_ips:
            if net.prefixlen == 0:
                log.warning("not routing a default route into the interface; add it yourself",
                            extra={"allowed_ip": str(net)})
                continue
            if net not in seen:
                seen.add(net)
                out.append(net)
    return out


class WgInterface:
    """One running interface: owns the TUN fd, the UDP sockets, the engine and the UAPI socket."""

    def __init__(self, cfg: WgConfig, name: str, *, run_dir: Path = RUN_DIR,
                 mtu: int | None = None, add_routes: bool = True, gso: bool = True,
                 gro: bool = True, tun_offload: bool = True) -> None:
        self.cfg = cfg
        self.name = name
        self.run_dir = run_dir
        self.mtu = mtu or cfg.mtu or tun.DEFAULT_MTU
        self.add_routes = add_routes
        self.gso = gso
        self.gro = gro
        self.tun_offload = tun_offload
        self.stats = Stats()
        self.device: Device = None  # type: ignore[assignment]
        self.tun_fd: int | None = None
        self.udp: UdpSockets | None = None
        self.uapi: UapiServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: DeadlineTimer | None = None
        self._batcher: SendBatcher = None  # type: ignore[assignment]
        self._readers: list[int] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create and configure everything, then start serving; on failure undo what was done."""
        try:
            await self._setup()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        log.info("interface up", extra={"iface": self.name, "port": self.udp.port,  # type: ignore[union-attr]
                                         "peers": len(self.cfg.peers), "mtu": self.mtu})

    async def _setup(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        endpoints = [await asyncio.to_thread(resolve_endpoint, *p.endpoint) if p.endpoint else None
                     for p in self.cfg.peers]
        self.device = Device(self.cfg.private_key, rng=SYSTEM_RNG, now=loop.time(),
                             unix_time=time.time())
        for p, ep in zip(self.cfg.peers, endpoints):
            self.device.add_peer(p.public_key, preshared_key=p.preshared_key,
                                 allowed_ips=[str(n) for n in p.allowed_ips], endpoint=ep,
                                 persistent_keepalive=p.persistent_keepalive, now=loop.time())
        try:
            self.udp = UdpSockets(self.cfg.listen_port)
        except OSError as e:
            raise WgSetupError(f"cannot bind UDP port {self.cfg.listen_port or 0}: {e.strerror}") from None
        if self.gro:
            self.udp.enable_gro()
        self.udp.gso = self.gso
        self._batcher = SendBatcher(self.udp)
        try:
            self.tun_fd, self.name = tun.open_tun(self.name, vnet_hdr=self.tun_offload)
        except OSError as e:
            raise WgSetupError(f"cannot create TUN interface {self.name}: {e.strerror or e}") from None
        try:
            await netlink.aconfigure_interface(
                self.name, mtu=self.mtu, addresses=self.cfg.addresses,
                routes=routes_for(self.cfg) if self.add_routes else [], txqueuelen=TUN_TXQUEUELEN)
        except OSError as e:
            raise WgSetupError(str(e)) from None
        uapi = UapiServer(self.name, self.snapshot, run_dir=self.run_dir)
        try:
            await uapi.start()
        except OSError as e:
            raise WgSetupError(f"control socket {uapi.path}: {e.strerror or e}") from None
        self.uapi = uapi
        self._timer = DeadlineTimer(loop, self._on_timer)
        loop.add_reader(self.tun_fd, self._on_tun_readable_vnet if self.tun_offload
                        else self._on_tun_readable)
        self._readers.append(self.tun_fd)
        for s in self.udp.sockets():
            loop.add_reader(s.fileno(), self._on_udp_readable, s)
            self._readers.append(s.fileno())
        self._after_batch()

    async def stop(self) -> None:
        if self.uapi is not None:
            await self.uapi.close()
            self.uapi = None
        had_tun = self.tun_fd is not None
        self.close_sync()
        if had_tun:
            # normally gone with its fd already; also covers a TUN someone else made persistent
            try:
                await netlink.adelete_link(self.name)
            except OSError as e:
                log.debug("delete link", extra={"error": str(e)})
        if self._started:
            self._started = False
            log.info("interface down", extra={
                "iface": self.name, "tun_packets_read": self.stats.tun_rx,
                "udp_datagrams_received": self.stats.udp_rx_datagrams,
                "udp_datagrams_sent": self._batcher.sent if self._batcher else 0,
                "drops": dict(self.drops())})

    def close_sync(self) -> None:
        """Stop reading and close every fd; closing the TUN fd removes the interface."""
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.tun_fd is not None:
            os.close(self.tun_fd)
            self.tun_fd = None

    async def run_until_signal(self) -> int:
        await self.start()
        try:
            return await wait_for_signals()
        finally:
            await self.stop()

    # -- data path -------------------------------------------------------------------------

    def _flush_transmits(self) -> None:
        poll = self.device.poll_transmit
        add = self._batcher.add
        while (t := poll()) is not None:
            add(t[0], t[1])
        self._batcher.flush()
        self.stats.udp_tx_drop += self._batcher.drops
        self._batcher.drops = 0

    def _after_batch(self) -> None:
        self._flush_transmits()
        dev = self.device
        while (item := dev.poll_event()) is not None:
            _pub, ev = item
            match ev:
                case HandshakeCompleted(initiated_by_us=ours):
                    log.debug("handshake completed", extra={"iface": self.name, "initiated_by_us": ours})
                case ConnectionExpired(reason=reason):
                    log.info("connection expired", extra={"iface": self.name, "reason": reason})
                case _:
                    log.debug("tunnel event", extra={"event": type(ev).__name__})
        self._timer.update(dev.poll_timeout())  # type: ignore[union-attr]

    def _on_timer(self) -> None:
        self.device.handle_timeout(self._loop.time())  # type: ignore[union-attr]
        self._after_batch()

    def _on_tun_readable(self) -> None:
        read = os.read
        fd = self.tun_fd
        handle = self.device.handle_tun_packet
        poll = self.device.poll_transmit
        add = self._batcher.add
        now = self._loop.time()  # type: ignore[union-attr]
        n = BATCH
        for i in range(BATCH):
            try:
                pkt = read(fd, RECV_SIZE)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                n = i
                break
            out = handle(pkt, now)
            if out is not None:
                add(out[0], out[1])
            while (t := poll()) is not None:
                add(t[0], t[1])
        self.stats.tun_rx += n
        self._after_batch()

    def _on_tun_readable_vnet(self) -> None:
        # Same as _on_tun_readable, behind the virtio-net header (all zero: no offloads asked for)
        read = os.read
        fd = self.tun_fd
        handle = self.device.handle_tun_packet
        poll = self.device.poll_transmit
        add = self._batcher.add
        now = self._loop.time()  # type: ignore[union-attr]
        n = BATCH
        for i in range(BATCH):
            try:
                buf = read(fd, RECV_SIZE)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                n = i
                break
            out = handle(memoryview(buf)[VNET_HDR_LEN:], now)
            if out is not None:
                add(out[0], out[1])
            while (t := poll()) is not None:
                add(t[0], t[1])
        self.stats.tun_rx += n
        self._after_batch()

    def _write_coalesced(self, packets: list[bytes]) -> int:
        write = os.write
        fd = self.tun_fd
        drops = 0
        for buf in coalesce(packets):
            try:
                write(fd, buf)  # type: ignore[arg-type]
            except OSError as e:
                drops += 1
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "tun write failed", extra={"error": e.strerror})
        return drops

    def _on_udp_readable(self, sock: socket.socket) -> None:
        handle = self.device.handle_datagram
        poll = self.device.poll_transmit
        add = self._batcher.add
        write = os.write
        fd = self.tun_fd
        v6 = sock.family == socket.AF_INET6
        gro = self.udp.gro  # type: ignore[union-attr]
        recvfrom = sock.recvfrom
        now = self._loop.time()  # type: ignore[union-attr]
        tun_drops = rx = 0
        pending: list[bytes] | None = [] if self.tun_offload else None
        for _ in range(BATCH):
            try:
                if gro:
                    datagrams, src = recv_segments(sock, RECV_SIZE)
                else:
                    data, src = recvfrom(RECV_SIZE)
                    datagrams = [data]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # an ICMP error queued on the socket by an earlier send
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "udp error", extra={"error": e.strerror})
                continue
            if v6:
                src = (src[0], src[1])
            rx += len(datagrams)
            for data in datagrams:
                pkt = handle(data, src, now)
                if pkt is not None:
                    if pending is not None:
                        pending.append(pkt)
                    else:
                        try:
                            write(fd, pkt)  # type: ignore[arg-type]
                        except OSError as e:
                            # EAGAIN, or EINVAL for a packet the kernel will not take: drop it
                            tun_drops += 1
                            if log.isEnabledFor(TRACE):
                                log.log(TRACE, "tun write failed", extra={"error": e.strerror})
                while (t := poll()) is not None:
                    add(t[0], t[1])
        if pending:
            tun_drops += self._write_coalesced(pending)
        self.stats.udp_rx_datagrams += rx
        self.stats.tun_tx_drop += tun_drops
        self._after_batch()

    # -- introspection ---------------------------------------------------------------------

    def snapshot(self) -> InterfaceInfo:
        dev = self.device
        peers = [PeerInfo(public_key=p.public_key, preshared_key=p.preshared_key,
                          endpoint=(p.endpoint[0], p.endpoint[1]) if p.endpoint else None,
                          last_handshake_unix=p.last_handshake_unix, rx_bytes=p.rx_bytes,
                          tx_bytes=p.tx_bytes, persistent_keepalive=int(p.persistent_keepalive or 0) or None,
                          allowed_ips=[str(a) for a in p.allowed_ips])
                 for p in dev.peers]
        return InterfaceInfo(private_key=self.cfg.private_key,
                             public_key=public_key(self.cfg.private_key),
                             listen_port=self.udp.port if self.udp else self.cfg.listen_port,
                             fwmark=self.cfg.fwmark or 0, peers=peers)

    def drops(self) -> Counter[str]:
        c: Counter[str] = Counter(self.device.drops)
        for peer in self.device.peers:
            c.update(peer.tunnel.drops)
        c["tun_write"] += self.stats.tun_tx_drop
        c["udp_send"] += self.stats.udp_tx_drop
        return +c


async def run(cfg: WgConfig, name: str, *, run_dir: Path = RUN_DIR) -> None:
    """Bring the interface up and serve it until SIGINT/SIGTERM."""
    iface = WgInterface(cfg, name, run_dir=run_dir)
    sig = await iface.run_until_signal()
    log.debug("stopping on signal", extra={"signal": sig})


def check_root() -> None:
    if os.geteuid() != 0:
        raise WgSetupError("creating a TUN interface needs root (or CAP_NET_ADMIN)")


