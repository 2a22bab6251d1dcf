"""Two or more :class:`~firezone.proto.node.Node` s, two relays and a stub portal on a SimNet.

The portal stub does what the real one does for the data plane: it mints TURN credentials per
relay and node (Firezone's REST-style scheme), hands both sides of a connection fresh ICE
credentials and a preshared key, and forwards ICE candidates between them. Signalling is
immediate; the network (latency, NATs, loss, partitions) is :class:`~tests.sim.simnet.SimNet`.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from firezone.proto.node import (
    DEFAULT_PORT,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    InvalidateIceCandidate,
    NewIceCandidate,
    Node,
    NodeEvent,
    PathChanged,
    RelayInfo,
)
from firezone.proto.rng import SeededRng
from firezone.proto.turn import SendToClient, SendToPeer, TurnServer, make_credentials
from firezone.proto.wireguard import b64encode_key, generate_private_key

from .simnet import SimNet

Addr = tuple[str, int]
TURN_PORT = 3478
UNIX0 = 1_800_000_000
RELAY_ADDRS = {"relay1": "203.0.113.101", "relay2": "203.0.113.102"}


class RelayHost:
    """A relay host on the SimNet: the pure TurnServer behind its listening and relayed ports."""

    def __init__(self, name: str, ip: str, seed: int, now: float, generation: int = 0,
                 secret: bytes | None = None) -> None:
        self.name = name
        self.ip = ip
        self.seed = seed
        self.generation = generation
        self.secret = secret or SeededRng(f"secret:{seed}:{name}:{generation}").token_bytes(32)
        self.server = TurnServer(
            secret=self.secret,
            public_ip4=ip,
            public_ip6=None,
            rng=SeededRng(f"relay:{seed}:{name}:{generation}"),
            now=now,
            unix_time=UNIX0 + now,
        )
        self.out: deque[tuple[Addr, Addr, bytes]] = deque()

    def restart(self, now: float) -> None:
        """A new process: every allocation is gone and the secret (so every credential) changes."""
        self.__init__(self.name, self.ip, self.seed, now, self.generation + 1)  # type: ignore[misc]

    def handle_datagram(self, src: Addr, dst: Addr, payload: bytes, now: float) -> None:
        if dst[1] == TURN_PORT:
            fast = self.server.relay_channel_data(payload, src, now)
            if fast is not None:
                data, peer, port = fast
                self.out.append(((self.ip, port), peer, bytes(data)))
            else:
                self.server.handle_client_datagram(payload, src, now)
        else:
            fast2 = self.server.relay_peer_data(payload, src, dst[1], now)
            if fast2 is not None:
                self.out.append(((self.ip, TURN_PORT), fast2[1], fast2[0]))
            else:
                self.server.handle_peer_datagram(payload, src, dst[1], 4, now)
        self._drain()

    def _drain(self) -> None:
        while (c := self.server.poll_command()) is not None:
            if isinstance(c, SendToClient):
                self.out.append(((self.ip, TURN_PORT), c.client, c.data))
            elif isinstance(c, SendToPeer):
                self.out.append(((self.ip, c.relay_port), c.peer, c.data))

    def handle_timeout(self, now: float) -> None:
        self.server.handle_timeout(now)
        self._drain()

    def poll_transmit(self) -> tuple[Addr, Addr, bytes] | None:
        return self.out.popleft() if self.out else None

    def poll_timeout(self) -> float | None:
        return self.server.poll_timeout()


def ip_packet(
    seq: int, size: int = 64, *, src: str = "100.64.0.1", dst: str = "100.64.0.2"
) -> bytes:
    """A minimal IPv4/UDP packet whose payload starts with ``seq`` (what the TUN would hand us)."""
    body = struct.pack("!Q", seq) + bytes(max(0, size - 28 - 8))
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(body), 0) + body
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, s, d)
    return hdr + udp


def packet_seq(packet: bytes) -> int:
    return int(struct.unpack_from("!Q", packet, 28)[0])


class NodeHost:
    """A client or gateway host: one Node bound to one simulated address (port 52625)."""

    def __init__(self, sim: Sim, name: str, ip: str, *, is_client: bool) -> None:
        self.sim = sim
        self.name = name
        self.ip = ip
        rng = SeededRng(f"node:{sim.seed}:{name}")
        self.private_key = generate_private_key(rng)
        self.node = Node(
            private_key=self.private_key,
            rng=rng,
            now=sim.now,
            unix_time=UNIX0 + sim.now,
            is_client=is_client,
        )
        self.node.add_local_interface((ip, DEFAULT_PORT), sim.now)
        self.received: list[tuple[float, str, bytes]] = []
        self.events: list[tuple[float, NodeEvent]] = []

    @property
    def public_key_b64(self) -> str:
        return b64encode_key(self.node.public_key)

    # SimNode protocol
    def handle_datagram(self, src: Addr, dst: Addr, payload: bytes, now: float) -> None:
        got = self.node.handle_datagram(dst, src, payload, now)
        if got is not None:
            self.received.append((now, got[0], bytes(got[1])))
        self.pump()

    def handle_timeout(self, now: float) -> None:
        self.node.handle_timeout(now)
        self.pump()

    def poll_transmit(self) -> Any:
        return self.node.poll_transmit()

    def poll_timeout(self) -> float | None:
        return self.node.poll_timeout()

    # application side
    def send(self, peer: str, packet: bytes) -> bool:
        """Hand an IP packet to the node as the TUN would; True if it left at once."""
        now = self.sim.now
        t = self.node.encapsulate(peer, packet, now)
        if t is not None:
            self.sim.net.send(t.src, t.dst, t.payload)
        self.pump()
        return t is not None

    def pump(self) -> None:
        now = self.sim.now
        while (ev := self.node.poll_event()) is not None:
            self.events.append((now, ev))
            if isinstance(ev, NewIceCandidate):
                self.sim.signal(self.name, ev.peer_id, ev.sdp, add=True)
            elif isinstance(ev, InvalidateIceCandidate):
                self.sim.signal(self.name, ev.peer_id, ev.sdp, add=False)

    def of(self, cls: type | tuple[type, ...], peer: str | None = None) -> list[Any]:
        return [
            e for _, e in self.events if isinstance(e, cls) and (peer is None or e.peer_id == peer)
        ]

    def path(self, peer: str) -> str | None:
        last = self.of(
            (ConnectionEstablished, PathChanged, ConnectionFailed, ConnectionClosed), peer
        )
        if not last or isinstance(last[-1], (ConnectionFailed, ConnectionClosed)):
            return None
        return last[-1].path

    def received_seqs(self, peer: str) -> list[int]:
        return [packet_seq(p) for _, pid, p in self.received if pid == peer]


class Sim:
    """The world: a SimNet, two relays, nodes, and a stub portal."""

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed
        self.net = SimNet(seed)
        self.relays: dict[str, RelayHost] = {}
        self.hosts: dict[str, NodeHost] = {}
        self._cred_seq = 0
        self.signalling = True
        for name, ip in RELAY_ADDRS.items():
            self.net.add_host(name, ip, latency=0.005)
            relay = RelayHost(name, ip, seed, self.now)
            self.net.attach(name, relay)
            self.relays[name] = relay

    @property
    def now(self) -> float:
        return self.net.clock.now

    def add_node(
        self, name: str, ip: str, *, is_client: bool, nat: str | None = None, latency: float = 0.015
    ) -> NodeHost:
        self.net.add_host(name, ip, nat=nat, latency=latency)
        host = NodeHost(self, name, ip, is_client=is_client)
        self.net.attach(name, host)
        self.hosts[name] = host
        self.sign_in(name)
        return host

    def relay_infos(self, host: NodeHost, relays: list[str] | None = None) -> list[RelayInfo]:
        out = []
        for name in relays if relays is not None else list(self.relays):
            r = self.relays[name]
            user, pwd = make_credentials(r.secret, host.public_key_b64, UNIX0 + 86400)
            out.append(RelayInfo(name, (r.ip, TURN_PORT), user, pwd))
        return out

    def sign_in(self, name: str, relays: list[str] | None = None) -> None:
        """What the portal's ``init`` does: give the node its relays (allocations start at once)."""
        host = self.hosts[name]
        host.node.update_relays(self.relay_infos(host, relays), self.now)
        host.pump()

    def restart_relay(self, name: str, *, tell_nodes: bool = True) -> None:
        """Restart a relay with a new secret; the portal then sends everyone new credentials."""
        self.relays[name].restart(self.now)
        if tell_nodes:
            for host in self.hosts.values():
                self.sign_in(host.name)

    def connect(self, client: str, gateway: str, *, gateway_psk: bytes | None = None) -> None:
        """The portal authorizes ``client`` -> ``gateway``: keys, PSK and ICE credentials.

        ``gateway_psk`` gives the gateway a different preshared key (a WireGuard mismatch).
        """
        self._cred_seq += 1
        rng = SeededRng(f"portal:{self.seed}:{self._cred_seq}")
        psk = rng.token_bytes(32)
        cu, cp = f"c{self._cred_seq}{rng.token_bytes(3).hex()}", rng.token_bytes(12).hex()
        gu, gp = f"g{self._cred_seq}{rng.token_bytes(3).hex()}", rng.token_bytes(12).hex()
        c, g = self.hosts[client], self.hosts[gateway]
        now = self.now
        g.node.upsert_connection(
            client,
            peer_public_key=c.node.public_key,
            preshared_key=psk if gateway_psk is None else gateway_psk,
            local_creds=(gu, gp),
            remote_creds=(cu, cp),
            now=now,
        )
        c.node.upsert_connection(
            gateway,
            peer_public_key=g.node.public_key,
            preshared_key=psk,
            local_creds=(cu, cp),
            remote_creds=(gu, gp),
            now=now,
        )
        g.pump()
        c.pump()

    def signal(self, src: str, dst: str, sdp: str, *, add: bool) -> None:
        if not self.signalling:
            return
        target = self.hosts.get(dst)
        if target is None:
            return
        if add:
            target.node.add_remote_candidate(src, sdp, self.now)
        else:
            target.node.remove_remote_candidate(src, sdp, self.now)
        target.pump()

    def run(self, duration: float, until: Any = None) -> bool:
        return self.net.run(duration=duration, until=until)

    def established(self, a: str, b: str) -> bool:
        return self.hosts[a].path(b) is not None and self.hosts[b].path(a) is not None
