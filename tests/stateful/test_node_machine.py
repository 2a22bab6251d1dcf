"""Hypothesis state machine: a client and two gateways (Nodes) through random network changes.

Reference model: which connections exist, which relays are online, and from the NAT kinds
whether a path between the client and a gateway certainly exists, certainly does not, or may
(:func:`path_outlook`). Invariants:

* a connection with a certain path never fails, and once settled every probe sent over it
  arrives exactly once, in both directions;
* a connection with certainly no path is reported failed by both sides within the ICE timeout
  of the loss becoming known (signalled at once, or found by a consent check when the path died
  silently); the controlled side may wait one consent interval longer for a renomination.

Rules: add / remove a peer, roam the client, drop a relay, bring it back, restart a relay with
new credentials, block UDP between the sites, send unchecked traffic, advance time, probe.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from firezone.proto.node import (
    CONTROLLED_RECONNECT_TIMEOUT,
    RECONNECT_TIMEOUT,
    ConnectionClosed,
    ConnectionFailed,
)
from tests.sim.node_harness import RELAY_ADDRS, Sim, ip_packet
from tests.sim.simnet import ADDRESS_AND_PORT_DEPENDENT as APD
from tests.sim.simnet import ADDRESS_DEPENDENT as AD
from tests.sim.simnet import ENDPOINT_INDEPENDENT as EI

NATS = {"open": None, "easy": (EI, AD), "symmetric": (APD, APD)}
GATEWAYS = {"gw1": ("192.0.2.130", "203.0.113.30"), "gw2": ("192.0.2.131", "203.0.113.31")}
# A failure must be reported within one ICE check run (plus the wait for renomination).
FAILURE_BOUND = RECONNECT_TIMEOUT + 2.0
# Time a settled pair gets after a disruption before its probes must all arrive: signalled
# changes (relays, roaming) move the path at once; a path that dies silently (UDP between the
# sites blocked) is noticed by the next consent check (every 25 s) failing after ~15 s.
SETTLE = 3.0
SILENT_DETECTION = 25.0 + 15.25
SETTLE_SILENT = SILENT_DETECTION + 3.0


def path_outlook(client_nat: str, gw_nat: str, relays_up: bool, blocked: bool = False) -> str:
    """``yes`` when a path certainly exists, ``no`` when it certainly does not, else ``maybe``.

    A relay that is up always gives a path (both sides allocate on it). Without relays, an open
    side can be reached by a check and answers the peer-reflexive address it came from; two
    symmetric NATs can never be punched; two NATs otherwise need server-reflexive addresses
    learned while a relay was up, which may or may not still map (NAT timeouts, roaming).
    """
    if relays_up:
        return "yes"
    if blocked or client_nat == gw_nat == "symmetric":
        return "no"
    if "open" in (client_nat, gw_nat):
        return "yes"
    return "maybe"


class NodeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: Sim
        self.nat: dict[str, str] = {}
        self.relays_up: set[str] = set(RELAY_ADDRS)
        self.conns: dict[str, float] = {}  # gateway -> when the portal (re)authorized it
        self.impossible_since: dict[str, float | None] = {}
        self.last_impossible: dict[str, float] = {}
        self.last_disruption = 0.0
        self.settle_until = 0.0
        self.blocked = False  # UDP between the client's and the gateways' sites is dropped
        self.silent_at = -1.0  # when UDP between the sites was last blocked
        self.seq = 0
        self.client_ip_n = 10
        self.seen: dict[tuple[str, str], int] = {}  # (side, gateway) -> failures seen
        self.failed: dict[str, set[str]] = {}  # gateway -> sides that reported failure

    @initialize(
        seed=st.integers(0, 2**16),
        client_nat=st.sampled_from(sorted(NATS)),
        gw_nats=st.tuples(st.sampled_from(sorted(NATS)), st.sampled_from(sorted(NATS))),
    )
    def build(self, seed: int, client_nat: str, gw_nats: tuple[str, str]) -> None:
        self.sim = Sim(seed)
        self.nat = {"client": client_nat, "gw1": gw_nats[0], "gw2": gw_nats[1]}
        self._add("client", ("192.0.2.10", "203.0.113.20"), client_nat, is_client=True)
        for gw, (priv, pub) in GATEWAYS.items():
            self._add(gw, (priv, pub), self.nat[gw], is_client=False)
        self.sim.run(1.0)

    def _add(self, name: str, ips: tuple[str, str], nat: str, *, is_client: bool) -> None:
        behaviour = NATS[nat]
        if behaviour is None:
            self.sim.add_node(name, ips[1], is_client=is_client)
        else:
            self.sim.net.add_nat(
                f"nat-{name}", ips[1], mapping=behaviour[0], filtering=behaviour[1]
            )
            self.sim.add_node(name, ips[0], is_client=is_client, nat=f"nat-{name}")

    # --- model ------------------------------------------------------------------------------
    def outlook(self, gw: str) -> str:
        return path_outlook(self.nat["client"], self.nat[gw], bool(self.relays_up), self.blocked)

    def _update_possibility(self) -> None:
        now = self.sim.now
        for gw in self.conns:
            o = self.outlook(gw)
            if o == "no":
                if self.impossible_since.get(gw) is None:
                    self.impossible_since[gw] = now
            else:
                self.impossible_since[gw] = None
            if o != "yes":
                self.last_impossible[gw] = now

    def _authorized(self, gw: str) -> None:
        """The portal (re)authorized the pair: a fresh ICE attempt starts its own clock."""
        self.sim.connect("client", gw)
        self.conns[gw] = self.sim.now
        self.impossible_since[gw] = None
        self.failed.pop(gw, None)

    def _disrupted(self, settle: float = SETTLE) -> None:
        self.last_disruption = self.sim.now
        self.settle_until = max(self.settle_until, self.sim.now + settle)
        self._update_possibility()

    def _run(self, seconds: float) -> None:
        # Step in slices so the model sees failures as they happen.
        end = self.sim.now + seconds
        while self.sim.now < end:
            self.sim.run(min(1.0, end - self.sim.now))
            self._update_possibility()
            self._collect_failures()
            self._check_deadlines()

    def _collect_failures(self) -> None:
        for gw in list(self.conns):
            sides = {
                "client": (self.sim.hosts["client"], gw),
                "gateway": (self.sim.hosts[gw], "client"),
            }
            for side, (host, peer) in sides.items():
                n = len(host.of(ConnectionFailed, peer))
                if n > self.seen.get((side, gw), 0):
                    self.seen[(side, gw)] = n
                    self.failed.setdefault(gw, set()).add(side)
            if not self.failed.get(gw):
                continue
            # Only allowed when the model lacked a certain path in the recent past.
            recent = self.last_impossible.get(gw)
            assert recent is not None and self.sim.now - recent <= FAILURE_BOUND + 2.0, (
                gw,
                self.failed[gw],
                self.nat,
                self.relays_up,
            )
            if self.outlook(gw) == "no" and len(self.failed[gw]) < 2:
                continue  # the other side must notice too (checked by the deadline)
            event("connection failed without a path")
            self._drop_pair(gw)

    def _drop_pair(self, gw: str) -> None:
        c, g = self.sim.hosts["client"], self.sim.hosts[gw]
        c.node.remove_connection(gw, self.sim.now)
        g.node.remove_connection("client", self.sim.now)
        c.pump()
        g.pump()
        self.conns.pop(gw, None)
        self.impossible_since.pop(gw, None)
        self.failed.pop(gw, None)

    # --- rules ------------------------------------------------------------------------------
    @rule(gw=st.sampled_from(sorted(GATEWAYS)))
    def add_peer(self, gw: str) -> None:
        self._authorized(gw)
        self._disrupted()

    @precondition(lambda self: bool(self.conns))
    @rule(data=st.data())
    def remove_peer(self, data: st.DataObject) -> None:
        gw = data.draw(st.sampled_from(sorted(self.conns)))
        c = self.sim.hosts["client"]
        had = gw in c.node.connections()  # not when it already failed on the client side
        closed = len(c.of(ConnectionClosed, gw))
        self._drop_pair(gw)
        assert len(c.of(ConnectionClosed, gw)) == closed + had
        assert c.node.encapsulate(gw, ip_packet(0), self.sim.now) is None

    @rule()
    def roam(self) -> None:
        """The client gets a new address; the portal re-authorizes its connections."""
        self.client_ip_n += 1
        host = self.sim.hosts["client"]
        behind = self.nat["client"] != "open"
        ip = f"192.0.2.{self.client_ip_n}" if behind else f"203.0.113.{self.client_ip_n + 40}"
        self.sim.net.roam("client", ip)
        host.node.add_local_interface((ip, 52625), self.sim.now)
        host.pump()
        self._apply_partition()
        for gw in sorted(self.conns):
            self._authorized(gw)
        self._disrupted()

    @precondition(lambda self: bool(self.relays_up))
    @rule(data=st.data())
    def drop_relay(self, data: st.DataObject) -> None:
        """A relay goes offline; the portal stops offering it."""
        name = data.draw(st.sampled_from(sorted(self.relays_up)))
        self.relays_up.discard(name)
        self.sim.net.set_up(name, False)
        self._resign_in()
        self._disrupted()

    @precondition(lambda self: len(self.relays_up) < len(RELAY_ADDRS))
    @rule(data=st.data())
    def relay_comes_back(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(set(RELAY_ADDRS) - self.relays_up)))
        self.sim.relays[name].restart(self.sim.now)
        self.sim.net.set_up(name, True)
        self.relays_up.add(name)
        self._resign_in()
        self._disrupted()

    @precondition(lambda self: bool(self.relays_up))
    @rule(data=st.data())
    def restart_relay(self, data: st.DataObject) -> None:
        """A relay restarts with a new secret; the portal hands out new credentials."""
        name = data.draw(st.sampled_from(sorted(self.relays_up)))
        self.sim.relays[name].restart(self.sim.now)
        self._resign_in()
        self._disrupted()

    def _resign_in(self) -> None:
        for host in self.sim.hosts.values():
            self.sim.sign_in(host.name, sorted(self.relays_up))

    @rule(on=st.booleans())
    def block_udp_between_sites(self, on: bool) -> None:
        """Drop (or allow again) UDP between the client's site and the gateways' sites.

        Nothing is signalled: a direct path in use dies silently and must be replaced by a
        relayed one once consent checks fail.
        """
        if on == self.blocked:
            return
        self.blocked = on
        if on:
            self.silent_at = self.sim.now
        self._apply_partition()
        self._disrupted(SETTLE_SILENT if on else SETTLE)

    def _apply_partition(self) -> None:
        net = self.sim.net
        net.heal()
        if self.blocked:
            side = {n: f"nat-{n}" if self.nat[n] != "open" else n for n in self.nat}
            for gw in GATEWAYS:
                net.partition(side["client"], side[gw])

    @precondition(lambda self: bool(self.conns))
    @rule()
    def send_traffic(self) -> None:
        """Application traffic both ways, unchecked: it drives WireGuard's timers (keepalives,
        handshakes after unanswered data) at any moment, also right after a disruption."""
        c = self.sim.hosts["client"]
        for gw in sorted(self.conns):
            self.seq += 1
            c.send(gw, ip_packet(self.seq))
            self.sim.hosts[gw].send("client", ip_packet(self.seq))

    @rule(seconds=st.sampled_from([0.2, 2.0, 10.0, 30.0, 130.0]))
    def advance_time(self, seconds: float) -> None:
        self._run(seconds)

    @precondition(lambda self: bool(self.conns))
    @rule()
    def probe(self) -> None:
        """Every settled, possible connection passes one packet each way exactly once."""
        wait = self.settle_until - self.sim.now
        if wait > 0:
            self._run(wait)
        c = self.sim.hosts["client"]
        targets = [
            gw
            for gw in sorted(self.conns)
            if self.outlook(gw) == "yes"
            and self.sim.now - self.last_impossible.get(gw, -1e9) > SETTLE
        ]
        if not targets:
            return
        probes = []
        for gw in targets:
            g = self.sim.hosts[gw]
            self.seq += 1
            c.send(gw, ip_packet(self.seq))
            g.send("client", ip_packet(self.seq))
            probes.append((gw, self.seq))
        self._run(1.5)
        for gw, seq in probes:
            if gw not in self.conns:
                continue  # failed (allowed by the model) while probing
            g = self.sim.hosts[gw]
            assert g.received_seqs("client").count(seq) == 1, (gw, seq, self.nat, self.relays_up)
            assert c.received_seqs(gw).count(seq) == 1, (gw, seq, self.nat, self.relays_up)
            event(f"probe passed ({c.path(gw)} path)")

    # --- invariants ------------------------------------------------------------------------------
    @invariant()
    def impossible_connections_fail_in_time(self) -> None:
        if hasattr(self, "sim"):
            self._check_deadlines()

    def _check_deadlines(self) -> None:
        for gw, since in list(self.impossible_since.items()):
            if since is not None and gw in self.conns:
                # A path that died silently is only noticed by a consent check.
                bound = FAILURE_BOUND + (
                    SILENT_DETECTION if self.silent_at >= self.conns[gw] else 0
                )
                if self.failed.get(gw) == {"client"}:
                    # The controlled side waits for a renomination a consent interval longer.
                    bound += CONTROLLED_RECONNECT_TIMEOUT - RECONNECT_TIMEOUT
                assert self.sim.now - since <= bound, (
                    f"{gw}: no path since {since:.1f}, at {self.sim.now:.1f} only "
                    f"{sorted(self.failed.get(gw, ()))} reported failure"
                )

    @invariant()
    def one_socket_per_node(self) -> None:
        if not hasattr(self, "sim"):
            return
        for name, host in self.sim.hosts.items():
            st_ = {c.base for c in host.node.local_candidates if c.kind == "host"}
            assert len(st_) <= 1, (name, st_)


NodeMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestNodeMachine = NodeMachine.TestCase
