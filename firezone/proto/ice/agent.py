"""A sans-IO ICE agent (RFC 8445) for one peer and one component, UDP only.

Theory of operation
-------------------
Inputs are local candidates (gathered by the caller: host sockets, server-reflexive addresses
learned from the relays, relayed addresses of TURN allocations), remote candidates trickled in
from the portal, STUN datagrams handed over by the driver, and time. Outputs are datagrams
(:class:`Transmit`, ``src`` being the socket's base address or a relayed address the caller
sends through its allocation) and events.

Pairs (``checklist.CheckList``) move ``Frozen -> Waiting -> In-Progress -> Succeeded | Failed``.
Every ``Ta`` one new check starts: a triggered check first, else the best Waiting pair. A check
is a Binding request retransmitted after 250 ms, doubling to 1.5 s, for at most 12 attempts
(about 15 s); no success response by then fails the pair. A Binding request from the peer is
answered, may teach a peer-reflexive remote candidate, and queues a triggered check on its pair.

Nomination is "regular" (§8.1.1): the controlling agent re-checks the best succeeded pair with
USE-CANDIDATE and selects it when that check succeeds; the controlled agent selects the best pair
nominated with USE-CANDIDATE once that pair is valid. Whenever a better pair succeeds later,
the controlling agent nominates it too, so a relayed path is replaced by a direct one as soon as
hole punching works. Priorities already rank host > srflx > relay, so "direct beats relayed".

Once a pair is selected both agents send a consent check on it every 25 s (RFC 7675, with the
same retransmission schedule). If a consent check times out the pair fails: the controlling agent
nominates the next valid pair; with none left the agent reports :class:`Disconnected`.
:class:`Failed` is reported when every pair has failed, or no remote candidate arrived within
``candidate_timeout``. Role conflicts are resolved with the 64-bit tie-breaker (§7.3.1.1), and
:meth:`IceAgent.restart` starts over with fresh credentials, keeping local candidates.

Events: ``Connected`` (first selection), ``NominatedPairChanged``, ``Disconnected``, ``Failed``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from firezone.logs import TRACE
from firezone.proto.rng import Rng

from . import stunwire
from .candidate import Addr, Candidate
from .checklist import TA, CheckList, Pair, PairState, rto_schedule
from .types import (
    Connected,
    Disconnected,
    Failed,
    IceEvent,
    NominatedPairChanged,
    Transmit,
    path_kind,
)

log = logging.getLogger(__name__)

# RFC 7675 / Firezone BINDING_INTERVAL: consent check on the selected pair every 25 s.
KEEPALIVE_INTERVAL = 25.0
# Firezone CANDIDATE_TIMEOUT: give up when no remote candidate arrived within 10 s.
CANDIDATE_TIMEOUT = 10.0
# Bound on remembered remote candidates (prflx included) so a peer cannot grow us without limit.
MAX_REMOTE_CANDIDATES = 64

_CHECK, _NOMINATE, _CONSENT = "check", "nominate", "consent"


@dataclass(slots=True)
class _Txn:
    txid: bytes
    pair: Pair
    purpose: str
    payload: bytes
    attempt: int  # attempts sent so far
    deadline: float  # next retransmission, or failure after the last attempt
    sent_at: float


class IceAgent:
    """ICE for one connection; see the module docstring for the state machine."""

    def __init__(
        self,
        *,
        controlling: bool,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        remote_pwd: str,
        rng: Rng,
        now: float,
        max_attempts: int = 12,
        initial_rto: float = 0.25,
        max_rto: float = 1.5,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        candidate_timeout: float = CANDIDATE_TIMEOUT,
        ta: float = TA,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.controlling = controlling
        self._rng = rng
        # RFC 8445 §16.1: a random 64-bit tie-breaker, kept across restarts.
        self.tiebreaker = int.from_bytes(rng.token_bytes(8), "big")
        self._schedule = rto_schedule(initial_rto, max_rto, max_attempts)
        self._keepalive_interval = keepalive_interval
        self._candidate_timeout = candidate_timeout
        self._ta = ta
        self.local_candidates: list[Candidate] = []
        self.remote_candidates: list[Candidate] = []
        self.checklist = CheckList()
        self._txns: dict[bytes, _Txn] = {}
        self._triggered: deque[Pair] = deque()
        self._transmits: deque[Transmit] = deque()
        self._events: deque[IceEvent] = deque()
        self._next_check = now
        # The latest time we were given: poll_timeout returns it while output waits.
        self._now = now
        self._selected: Pair | None = None
        self._next_keepalive: float | None = None
        self._failed_reported = False
        self._ever_connected = False
        self._disconnected = False  # after Disconnected, the next selection is a fresh Connected
        self.stats: dict[str, int] = {}
        self._set_credentials(local_ufrag, local_pwd, remote_ufrag, remote_pwd, now)

    # --- configuration ----------------------------------------------------------------------
    def _set_credentials(self, lu: str, lp: str, ru: str, rp: str, now: float) -> None:
        for name, v in (("local_ufrag", lu), ("remote_ufrag", ru)):
            if not v or ":" in v:
                raise ValueError(f"{name} must be non-empty and contain no ':'")
        if not lp or not rp:
            raise ValueError("ICE passwords must be non-empty")
        self.local_ufrag, self.remote_ufrag = lu, ru
        self._local_key = lp.encode()
        self._remote_key = rp.encode()
        self._started = now

    def restart(
        self, local_ufrag: str, local_pwd: str, remote_ufrag: str, remote_pwd: str, now: float
    ) -> None:
        """ICE restart (§9): new credentials, forget remote candidates and all check state."""
        self._now = max(self._now, now)
        self._set_credentials(local_ufrag, local_pwd, remote_ufrag, remote_pwd, now)
        self.remote_candidates.clear()
        self.checklist.clear()
        self._txns.clear()
        self._triggered.clear()
        self._selected = None
        self._next_keepalive = None
        self._failed_reported = False
        self._ever_connected = False  # the next selection is reported as Connected again
        self._disconnected = False
        self._next_check = now
        log.debug("ICE restart")

    def add_local_candidate(self, c: Candidate) -> None:
        """Add a local candidate and pair it with every remote candidate."""
        if c.kind == "srflx":
            # §6.1.2.4: a srflx candidate is checked from its base, which the host candidate covers.
            base = self._host_for(c.base)
            if base is not None:
                if c not in self.local_candidates:
                    self.local_candidates.append(c)
                return
            c = Candidate.host(c.base, c.component)
        if any(lc.kind == c.kind and lc.addr == c.addr for lc in self.local_candidates):
            return
        self.local_candidates.append(c)
        if self._failed_reported and not self._ever_connected and self.remote_candidates:
            self._failed_reported = False  # new pairs to try
        for r in self.remote_candidates:
            self.checklist.add(c, r, self.controlling)

    def remove_local_candidate(self, base: Addr, now: float) -> None:
        """Forget a local base (a lost allocation or a vanished interface)."""
        self._now = max(self._now, now)
        self.local_candidates = [c for c in self.local_candidates if c.base != base]
        gone = self.checklist.remove_local(base)
        for txid in [t for t, txn in self._txns.items() if txn.pair in gone]:
            del self._txns[txid]
        self._triggered = deque(p for p in self._triggered if p not in gone)
        if self._selected is not None and self._selected in gone:
            self._selected = None
            self._on_selected_lost(now)

    def add_remote_candidate(self, c: Candidate, now: float) -> None:
        """Add a trickled remote candidate and pair it with every local base."""
        self._now = max(self._now, now)
        if any(rc.addr == c.addr for rc in self.remote_candidates):
            return
        if len(self.remote_candidates) >= MAX_REMOTE_CANDIDATES:
            self._count("remote_candidates_dropped")
            return
        self.remote_candidates.append(c)
        if self._failed_reported and not self._ever_connected:
            self._failed_reported = False
        for lc in self._bases():
            self.checklist.add(lc, c, self.controlling)
        self._next_check = max(self._next_check, now)

    def _bases(self) -> list[Candidate]:
        return [c for c in self.local_candidates if c.kind in ("host", "relay")]

    def _host_for(self, base: Addr) -> Candidate | None:
        for c in self.local_candidates:
            if c.base == base and c.kind in ("host", "relay"):
                return c
        return None

    # --- queries ------------------------------------------------------------------------------
    @property
    def selected_pair(self) -> tuple[Candidate, Candidate] | None:
        """The nominated (local, remote) pair in use, if any."""
        p = self._selected
        return (p.local, p.remote) if p is not None else None

    @property
    def selected_rtt(self) -> float | None:
        return self._selected.rtt if self._selected is not None else None

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # --- outputs ------------------------------------------------------------------------------
    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """The next instant :meth:`handle_timeout` has work to do (``now`` while output is queued)."""
        if self._transmits or self._events:
            return self._now
        deadlines: list[float] = [t.deadline for t in self._txns.values()]
        if self._triggered or self._has_waiting():
            deadlines.append(self._next_check)
        if self._next_keepalive is not None:
            deadlines.append(self._next_keepalive)
        if not self._failed_reported and not self.remote_candidates and not self._ever_connected:
            deadlines.append(self._started + self._candidate_timeout)
        return min(deadlines) if deadlines else None

    def _has_waiting(self) -> bool:
        return any(p.state in (PairState.WAITING, PairState.FROZEN) for p in self.checklist.pairs)

    # --- timers -------------------------------------------------------------------------------
    def handle_timeout(self, now: float) -> None:
        """Retransmit, time out transactions, pace new checks and send consent checks."""
        self._now = max(self._now, now)
        for txn in [t for t in self._txns.values() if t.deadline <= now]:
            if txn.txid not in self._txns:
                continue
            if txn.attempt >= len(self._schedule):
                self._txn_failed(txn, now)
            else:
                self._send_txn(txn, now)
        if now >= self._next_check:
            pair = self._next_pair_to_check()
            if pair is not None:
                self._start_check(pair, _CHECK, now)
                self._next_check = now + self._ta
        if (
            self._next_keepalive is not None
            and now >= self._next_keepalive
            and self._selected is not None
        ):
            if not any(
                t.pair is self._selected and t.purpose == _CONSENT for t in self._txns.values()
            ):
                self._start_check(self._selected, _CONSENT, now)
            self._next_keepalive = now + self._keepalive_interval
        if (
            not self._failed_reported
            and not self.remote_candidates
            and not self._ever_connected
            and now >= self._started + self._candidate_timeout
        ):
            self._report_failed("no remote candidates")
        self._check_all_failed()

    def _next_pair_to_check(self) -> Pair | None:
        while self._triggered:
            p = self._triggered.popleft()
            if p in self.checklist.pairs and not self._in_flight(p, _CHECK):
                return p
        return self.checklist.next_waiting()

    def _in_flight(self, pair: Pair, purpose: str) -> bool:
        return any(t.pair is pair and t.purpose == purpose for t in self._txns.values())

    def _start_check(self, pair: Pair, purpose: str, now: float) -> None:
        txid = self._rng.token_bytes(12)
        use_candidate = purpose == _NOMINATE
        # §7.1.1: PRIORITY is what a prflx candidate learned from this check would get.
        prflx_priority = (110 << 24) | (pair.local.priority & 0xFFFFFF)
        payload = stunwire.binding_request(
            txid,
            username=f"{self.remote_ufrag}:{self.local_ufrag}",
            key=self._remote_key,
            priority=prflx_priority,
            controlling=self.controlling,
            tiebreaker=self.tiebreaker,
            use_candidate=use_candidate,
        )
        if purpose == _CHECK:
            pair.state = PairState.IN_PROGRESS
        txn = _Txn(txid, pair, purpose, payload, 0, now, now)
        self._txns[txid] = txn
        self._send_txn(txn, now)

    def _send_txn(self, txn: _Txn, now: float) -> None:
        txn.deadline = now + self._schedule[txn.attempt]
        txn.attempt += 1
        txn.sent_at = now
        self._transmits.append(Transmit(txn.pair.local.base, txn.pair.remote.addr, txn.payload))
        if log.isEnabledFor(TRACE):
            log.log(
                TRACE,
                "STUN check",
                extra={"purpose": txn.purpose, "attempt": txn.attempt, "dst": txn.pair.remote.addr},
            )

    def _txn_failed(self, txn: _Txn, now: float) -> None:
        del self._txns[txn.txid]
        pair = txn.pair
        log.debug("ICE pair timed out", extra={"purpose": txn.purpose, "remote": pair.remote.addr})
        pair.state = PairState.FAILED
        pair.nominated = False
        if pair is self._selected:
            self._selected = None
            self._on_selected_lost(now)
        elif txn.purpose == _NOMINATE and self._selected is None and not self._maybe_nominate(now):
            self._disconnect()

    def _on_selected_lost(self, now: float) -> None:
        self._next_keepalive = None
        if self.controlling and self._maybe_nominate(now):
            return
        # The controlled side falls back to another nominated pair if one is still valid.
        if not self.controlling:
            for p in self.checklist.valid():
                if p.nominated:
                    self._select(p, now)
                    return
        self._disconnect()

    def _disconnect(self) -> None:
        if self._ever_connected and not self._disconnected and self._selected is None:
            self._disconnected = True
            self._events.append(Disconnected())
            log.debug("ICE disconnected")

    def _check_all_failed(self) -> None:
        if self._failed_reported or self._selected is not None or self._txns:
            return
        if self.checklist.all_failed():
            self._report_failed("all candidate pairs failed")

    def _report_failed(self, reason: str) -> None:
        self._failed_reported = True
        self._events.append(Failed(reason))
        log.debug("ICE failed", extra={"reason": reason})

    # --- nomination -----------------------------------------------------------------------------
    def _maybe_nominate(self, now: float) -> bool:
        """Controlling: nominate the best valid pair if it beats the selected one."""
        if not self.controlling:
            return False
        valid = self.checklist.valid()
        if not valid:
            return False
        best = valid[0]
        if self._selected is not None and best.priority <= self._selected.priority:
            return False
        if self._in_flight(best, _NOMINATE):
            return True
        self._start_check(best, _NOMINATE, now)
        return True

    def _accept_nomination(self, pair: Pair, now: float) -> None:
        """Controlled: §8.1.1, the highest-priority nominated pair wins.

        A late retransmission of an older, worse nomination must not pull us back to it.
        """
        pair.nominated = True
        sel = self._selected
        if sel is None or pair.priority > sel.priority or sel.state == PairState.FAILED:
            self._select(pair, now)

    def _select(self, pair: Pair, now: float) -> None:
        if pair is self._selected:
            return
        pair.nominated = True
        self._selected = pair
        self._next_keepalive = now + self._keepalive_interval
        kind = path_kind(pair.local, pair.remote)
        if not self._ever_connected or self._disconnected:
            self._ever_connected = True
            self._disconnected = False
            self._events.append(Connected(pair.local, pair.remote, kind, pair.rtt))
        else:
            self._events.append(NominatedPairChanged(pair.local, pair.remote, kind, pair.rtt))
        log.debug(
            "ICE pair selected", extra={"kind": kind, "remote": pair.remote.addr, "rtt": pair.rtt}
        )

    # --- input ----------------------------------------------------------------------------------
    def handle_stun(self, msg_bytes: bytes, local: Addr, remote: Addr, now: float) -> bool:
        """Feed a STUN datagram received on ``local`` from ``remote``; True if it belonged to us."""
        self._now = max(self._now, now)
        try:
            msg = stunwire.parse(msg_bytes)
        except ValueError:
            self._count("malformed")
            return False
        if msg.method != stunwire.BINDING:
            return False
        if msg.is_request:
            return self._handle_request(msg, local, remote, now)
        if msg.is_response:
            txn = self._txns.get(msg.transaction_id)
            if txn is None:
                return False
            return self._handle_response(msg, txn, local, remote, now)
        # Binding indications are plain keepalives (RFC 7675 §5.1 would ignore them too).
        return False

    def _handle_request(self, msg: stunwire.Parsed, local: Addr, remote: Addr, now: float) -> bool:
        username = msg.username
        if username is None or username.split(":", 1)[0] != self.local_ufrag:
            return False
        if not msg.verify(self._local_key):
            self._count("bad_integrity")
            log.debug("ICE request with bad integrity dropped")
            return True
        base = self._local_base(local)
        if base is None:
            self._count("unknown_local")
            return True
        if msg.priority is None or not 0 < msg.priority < 2**32:
            # RFC 8445 §7.1.1 makes PRIORITY mandatory in checks; RFC 8489 §6.3.1.1: 400.
            self._reply_error(msg, local, remote, 400)
            return True
        # §7.3.1.1: role conflicts.
        if self.controlling and msg.ice_controlling is not None:
            if self.tiebreaker >= msg.ice_controlling:
                self._reply_error(msg, local, remote, 487)
                return True
            self._switch_role(False)
        elif not self.controlling and msg.ice_controlled is not None:
            if self.tiebreaker >= msg.ice_controlled:
                self._switch_role(True)
            else:
                self._reply_error(msg, local, remote, 487)
                return True
        self._transmits.append(
            Transmit(
                local, remote, stunwire.binding_success(msg.transaction_id, remote, self._local_key)
            )
        )
        remote_c = self._remote_candidate(remote, msg.priority)
        if remote_c is None:
            return True
        pair = self.checklist.get(base.base, remote)
        if pair is None:
            pair = self.checklist.add(base, remote_c, self.controlling)
            if pair is None:
                return True
        if msg.use_candidate and not self.controlling:
            if pair.state == PairState.SUCCEEDED:
                self._accept_nomination(pair, now)
            else:
                pair.nominate_on_success = True
        # §7.3.1.4: triggered check, unless it already succeeded or is on its way.
        if pair.state != PairState.SUCCEEDED and not self._in_flight(pair, _CHECK):
            if pair.state in (PairState.FROZEN, PairState.FAILED):
                pair.state = PairState.WAITING
            if pair not in self._triggered:
                self._triggered.append(pair)
        return True

    def _local_base(self, local: Addr) -> Candidate | None:
        for c in self.local_candidates:
            if c.base == local and c.kind in ("host", "relay"):
                return c
        return None

    def _remote_candidate(self, remote: Addr, priority: int) -> Candidate | None:
        for c in self.remote_candidates:
            if c.addr == remote:
                return c
        if len(self.remote_candidates) >= MAX_REMOTE_CANDIDATES:
            self._count("remote_candidates_dropped")
            return None
        # §7.3.1.3: an unknown source becomes a peer-reflexive remote candidate.
        c = Candidate.peer_reflexive(remote, remote, priority)
        self.remote_candidates.append(c)
        log.debug("learned peer-reflexive candidate", extra={"addr": remote})
        return c

    def _reply_error(self, msg: stunwire.Parsed, local: Addr, remote: Addr, code: int) -> None:
        self._transmits.append(
            Transmit(
                local, remote, stunwire.binding_error(msg.transaction_id, code, self._local_key)
            )
        )

    def _switch_role(self, controlling: bool) -> None:
        log.debug("ICE role switch", extra={"controlling": controlling})
        self.controlling = controlling
        self.checklist.recompute_priorities(controlling)

    def _handle_response(
        self, msg: stunwire.Parsed, txn: _Txn, local: Addr, remote: Addr, now: float
    ) -> bool:
        pair = txn.pair
        if not msg.verify(self._remote_key):
            self._count("bad_integrity")
            return True
        # §7.2.5.2.1: responses must come back on the same pair of addresses.
        if remote != pair.remote.addr or local != pair.local.base:
            self._count("asymmetric_response")
            return True
        del self._txns[txn.txid]
        if msg.is_error:
            if msg.error_code == 487 and txn.purpose in (_CHECK, _NOMINATE):
                # §7.2.5.1: switch to the role opposite of the one the request claimed, then retry.
                self._switch_role(not self.controlling)
                pair.state = PairState.WAITING
                self._triggered.append(pair)
                return True
            pair.state = PairState.FAILED
            if pair is self._selected:
                self._selected = None
                self._on_selected_lost(now)
            return True
        pair.rtt = now - txn.sent_at
        pair.last_response = now
        pair.mapped = msg.mapped_address
        was_valid = pair.state == PairState.SUCCEEDED
        pair.state = PairState.SUCCEEDED
        if not was_valid:
            pair.succeeded_at = now
            self.checklist.unfreeze_foundation(pair.foundation)
            log.debug("ICE pair succeeded", extra={"remote": pair.remote.addr, "rtt": pair.rtt})
        if txn.purpose == _NOMINATE and self.controlling:
            if (
                self._selected is None
                or pair.priority > self._selected.priority
                or pair is self._selected
            ):
                self._select(pair, now)
        elif not self.controlling and pair.nominate_on_success:
            pair.nominate_on_success = False
            self._accept_nomination(pair, now)
        if self.controlling and txn.purpose == _CHECK:
            self._maybe_nominate(now)
        return True
