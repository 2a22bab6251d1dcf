"""NodeDriver: two nodes on loopback UDP, a datagram socketpair standing in for each TUN.

No root needed: the "TUN" is one end of an AF_UNIX SOCK_DGRAM pair, which keeps packet
boundaries for ``os.read`` / ``os.write`` exactly as a TUN fd does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import socket
import struct
import time

import pytest
import uvloop

from firezone.proto.node import ConnectionEstablished, Node, NodeEvent
from firezone.proto.wireguard.keys import generate_private_key
from firezone.runtime.node_driver import NodeDriver
from firezone.runtime.rng import SYSTEM_RNG

pytestmark = pytest.mark.timeout(30)

PEER = "peer"


def ipv4_udp(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + 8 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


class Side:
    def __init__(self, is_client: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.key = generate_private_key(SYSTEM_RNG)
        self.node = Node(private_key=self.key, rng=SYSTEM_RNG, now=loop.time(),
                         unix_time=time.time(), is_client=is_client)
        self.tun, self.app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.setblocking(False)
        self.app.setblocking(False)
        self.events: list[NodeEvent] = []
        self.other: Side | None = None
        self.driver = NodeDriver(self.node, tun_fd=self.tun.fileno(), local_ips=["127.0.0.1"],
                                 route=lambda _pkt: PEER, on_event=self.on_event, port=0)

    def on_event(self, ev: NodeEvent) -> None:
        self.events.append(ev)
        sdp = getattr(ev, "sdp", None)
        if sdp is not None and type(ev).__name__ == "NewIceCandidate":
            assert self.other is not None
            self.other.node.add_remote_candidate(PEER, sdp, self.other.driver.now())
            self.other.driver.wake()

    def close(self) -> None:
        self.driver.close()
        self.tun.close()
        self.app.close()


async def _recv(sock: socket.socket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return sock.recv(65535)
        except BlockingIOError:
            if loop.time() > deadline:
                raise AssertionError("no packet arrived") from None
            await asyncio.sleep(0.005)


async def _scenario(n_packets: int) -> tuple[list[NodeEvent], list[bytes], list[bytes], bytes]:
    loop = asyncio.get_running_loop()
    client, gateway = Side(True, loop), Side(False, loop)
    client.other, gateway.other = gateway, client
    try:
        client.driver.start()
        gateway.driver.start()
        assert client.driver.port != gateway.driver.port
        c_creds = (secrets.token_hex(4), secrets.token_hex(12))
        g_creds = (secrets.token_hex(4), secrets.token_hex(12))
        psk = secrets.token_bytes(32)
        # the first packet goes in before the connection exists on the client: buffered
        first = ipv4_udp("100.64.0.1", "100.64.0.2", b"first")
        gateway.node.upsert_connection(PEER, peer_public_key=client.node.public_key,
                                       preshared_key=psk, local_creds=g_creds,
                                       remote_creds=c_creds, now=loop.time())
        client.node.upsert_connection(PEER, peer_public_key=gateway.node.public_key,
                                      preshared_key=psk, local_creds=c_creds,
                                      remote_creds=g_creds, now=loop.time())
        client.app.send(first)
        gateway.driver.wake()
        client.driver.wake()
        got_first = await _recv(gateway.app, 10)
        sent = [ipv4_udp("100.64.0.1", "100.64.0.2", os.urandom(1000)) for _ in range(n_packets)]
        received: list[bytes] = []
        # an AF_UNIX datagram queue holds only a few packets: send in small bursts
        for i in range(0, len(sent), 8):
            burst = sent[i:i + 8]
            for p in burst:
                client.app.send(p)
            received += [await _recv(gateway.app, 5) for _ in burst]
        back = ipv4_udp("100.64.0.2", "100.64.0.1", b"reply")
        gateway.app.send(back)
        got_back = await _recv(client.app, 5)
        assert got_back == back
        return client.events, sent, received, got_first
    finally:
        client.close()
        gateway.close()


def test_two_drivers_carry_packets_both_ways_over_loopback() -> None:
    events, sent, received, first = uvloop.run(_scenario(300))
    assert first == ipv4_udp("100.64.0.1", "100.64.0.2", b"first")
    assert received == sent  # one socket, no loss on loopback with 4 MB buffers, in order
    est = [e for e in events if isinstance(e, ConnectionEstablished)]
    assert len(est) == 1 and est[0].path == "host"


def test_driver_needs_a_local_address() -> None:
    async def make() -> None:
        node = Node(private_key=generate_private_key(SYSTEM_RNG), rng=SYSTEM_RNG,
                    now=asyncio.get_running_loop().time(), unix_time=time.time(), is_client=True)
        with pytest.raises(ValueError, match="at least one local IP"):
            NodeDriver(node, tun_fd=None, local_ips=[], route=lambda _p: None,
                       on_event=lambda _e: None)
        with pytest.raises(ValueError, match="at most one local IPv4"):
            NodeDriver(node, tun_fd=None, local_ips=["127.0.0.1", "127.0.0.2"],
                       route=lambda _p: None, on_event=lambda _e: None)

    uvloop.run(make())
