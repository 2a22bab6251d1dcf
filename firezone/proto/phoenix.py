"""Phoenix-channel client as a sans-IO state machine (shared by relay, gateway and client).

Theory of operation
-------------------
One channel (topic ``client``, ``gateway`` or ``relay``) over one WebSocket. States::

    DISCONNECTED --(backoff elapsed)--> CONNECTING --(handle_connected)--> JOINING
    JOINING --(phx_reply ok to our join)--> JOINED
    JOINING --(join not answered in JOIN_TIMEOUT)--> DISCONNECTED (reconnect with backoff)
    JOINED --(HEARTBEAT_INTERVAL)--> heartbeat sent; MAX_MISSED unanswered -> DISCONNECTED
    any --(handle_closed / handle_connect_failed 5xx, 409, network)--> DISCONNECTED
    any --(401/403, or disconnect frame)--> STOPPED (fatal: the token is no good any more)

The driver performs the actions it polls (``Connect``, ``Close``), feeds WebSocket text frames
to :meth:`PhoenixChannel.handle_text`, and sends what :meth:`poll_transmit` yields. Reconnects
use exponential backoff (0.5 s, x1.5, capped at 60 s, +-50 % jitter); a successful join resets it;
a ``Retry-After`` from the portal overrides the next delay.

Frames are JSON objects ``{"topic", "event", "payload", "ref"}``; replies are ``phx_reply`` with
``{"status": "ok"|"error", "response": ...}`` and the ref of the request.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from firezone.proto.rng import Rng

HEARTBEAT_INTERVAL = 10.0
JOIN_TIMEOUT = 5.0
MAX_MISSED_HEARTBEATS = 3
BACKOFF_INITIAL = 0.5
BACKOFF_MULTIPLIER = 1.5
BACKOFF_MAX = 60.0
BACKOFF_JITTER = 0.5
HEARTBEAT_TOPIC = "phoenix"
FATAL_STATUSES = frozenset({401, 403})


class State(Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    JOINING = "joining"
    JOINED = "joined"
    STOPPED = "stopped"


# -- actions for the driver ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open the WebSocket now."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket (the machine already considers it gone)."""

    reason: str


# -- events for the layer above --------------------------------------------------------------


class ChannelEvent:
    pass


@dataclass(frozen=True, slots=True)
class Joined(ChannelEvent):
    response: Any


@dataclass(frozen=True, slots=True)
class Message(ChannelEvent):
    """A push from the portal on our topic (``init``, ``resource_deleted``, ...)."""

    event: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Reply(ChannelEvent):
    """The portal's answer to a message we sent with :meth:`PhoenixChannel.send`."""

    ref: str
    ok: bool
    response: Any


@dataclass(frozen=True, slots=True)
class Disconnected(ChannelEvent):
    """The connection is gone; the machine reconnects after ``retry_in`` seconds."""

    reason: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class Stopped(ChannelEvent):
    """Fatal: the portal refused us (401/403) or told us to go (``disconnect``). No reconnect."""

    reason: str


@dataclass
class _Pending:
    ref: str
    sent_at: float


@dataclass
class PhoenixChannel:
    topic: str
    join_payload: dict[str, Any]
    rng: Rng
    now: float
    max_partition_time: float | None = None
    state: State = State.DISCONNECTED
    _ref: int = 0
    _join_ref: str | None = None
    _join_deadline: float | None = None
    _next_heartbeat: float | None = None
    _heartbeat_ref: str | None = None
    _missed: int = 0
    _attempt: int = 0
    _reconnect_at: float | None = None
    _disconnected_since: float | None = None
    _actions: deque[Connect | Close] = field(default_factory=deque)
    _transmits: deque[str] = field(default_factory=deque)
    _events: deque[ChannelEvent] = field(default_factory=deque)
    _outbox: deque[str] = field(default_factory=deque)  # messages sent while not joined

    def __post_init__(self) -> None:
        self._reconnect_at = self.now
        self._disconnected_since = self.now

    # -- inputs ---------------------------------------------------------------------------------

    def handle_connected(self, now: float) -> None:
        """The WebSocket is open: join the topic."""
        if self.state is not State.CONNECTING:
            return
        self.state = State.JOINING
        self._join_ref = self._next_ref()
        self._join_deadline = now + JOIN_TIMEOUT
        self._frame(self.topic, "phx_join", self.join_payload, self._join_ref)

    def handle_connect_failed(self, now: float, *, status: int | None = None, reason: str = "",
                              retry_after: float | None = None) -> None:
        """The WebSocket could not be opened (``status`` is the HTTP status when there was one)."""
        if self.state is State.STOPPED:
            return
        if status in FATAL_STATUSES:
            self._stop(now, f"portal refused the connection ({status}): {reason or 'unauthorized'}")
            return
        self._lost(now, reason or (f"HTTP {status}" if status else "connect failed"), retry_after)

    def handle_closed(self, now: float, reason: str = "closed by peer") -> None:
        if self.state in (State.DISCONNECTED, State.STOPPED):
            return
        self._lost(now, reason, None)

    def handle_text(self, text: str, now: float) -> None:
        """One text frame from the portal. Malformed frames are ignored."""
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        topic, event, payload, ref = msg.get("topic"), msg.get("event"), msg.get("payload"), msg.get("ref")
        if not isinstance(event, str):
            return
        if event == "phx_reply":
            self._on_reply(ref, payload, now)
            return
        if event == "disconnect":
            reason = payload.get("reason", "disconnect") if isinstance(payload, dict) else "disconnect"
            self._stop(now, str(reason))
            return
        if event in ("phx_error", "phx_close") and topic == self.topic:
            self._lost(now, f"channel {event}", None)
            return
        if topic == self.topic and self.state is State.JOINED:
            self._events.append(Message(event, payload))

    def handle_timeout(self, now: float) -> None:
        self.now = now
        if self.state is State.DISCONNECTED and self._reconnect_at is not None and now >= self._reconnect_at:
            if (self.max_partition_time is not None and self._disconnected_since is not None
                    and now - self._disconnected_since > self.max_partition_time):
                self._stop(now, "portal unreachable for longer than the maximum partition time")
                return
            self.state = State.CONNECTING
            self._reconnect_at = None
            self._actions.append(Connect())
        elif self.state is State.JOINING and self._join_deadline is not None and now >= self._join_deadline:
            self._close(now, "join timed out")
        elif self.state is State.JOINED and self._next_heartbeat is not None and now >= self._next_heartbeat:
            if self._heartbeat_ref is not None:
                self._missed += 1
                if self._missed >= MAX_MISSED_HEARTBEATS:
                    self._close(now, "heartbeat timed out")
                    return
            self._heartbeat_ref = self._next_ref()
            self._frame(HEARTBEAT_TOPIC, "heartbeat", {}, self._heartbeat_ref)
            self._next_heartbeat = now + HEARTBEAT_INTERVAL

    # -- commands -------------------------------------------------------------------------------

    def send(self, event: str, payload: Any) -> str:
        """Queue a message on our topic; returns its ref. Held until joined."""
        ref = self._next_ref()
        frame = json.dumps({"topic": self.topic, "event": event, "payload": payload, "ref": ref})
        if self.state is State.JOINED:
            self._transmits.append(frame)
        else:
            self._outbox.append(frame)
        return ref

    def reconnect(self, now: float, reason: str = "reconnect requested") -> None:
        """Drop the connection and connect again right away (SIGHUP, network change)."""
        if self.state is State.STOPPED:
            return
        if self.state is not State.DISCONNECTED:
            self._actions.append(Close(reason))
        self.state = State.DISCONNECTED
        self._attempt = 0
        self._reconnect_at = now
        self._disconnected_since = now

    def stop(self, now: float, reason: str = "stopped") -> None:
        self._stop(now, reason)

    # -- outputs --------------------------------------------------------------------------------

    def poll_action(self) -> Connect | Close | None:
        return self._actions.popleft() if self._actions else None

    def poll_transmit(self) -> str | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> ChannelEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        if self._actions or self._transmits or self._events:
            return self.now
        if self.state is State.DISCONNECTED:
            return self._reconnect_at
        if self.state is State.JOINING:
            return self._join_deadline
        if self.state is State.JOINED:
            return self._next_heartbeat
        return None

    # -- internals ------------------------------------------------------------------------------

    def _next_ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    def _frame(self, topic: str, event: str, payload: Any, ref: str) -> None:
        self._transmits.append(json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}))

    def _on_reply(self, ref: Any, payload: Any, now: float) -> None:
        if not isinstance(ref, str) or not isinstance(payload, dict):
            return
        ok = payload.get("status") == "ok"
        response = payload.get("response")
        if ref == self._join_ref and self.state is State.JOINING:
            if not ok:
                reason = response.get("reason", "join refused") if isinstance(response, dict) else "join refused"
                self._close(now, f"join refused: {reason}")
                return
            self.state = State.JOINED
            self._join_deadline = None
            self._attempt = 0
            self._disconnected_since = None
            self._missed = 0
            self._heartbeat_ref = None
            self._next_heartbeat = now + HEARTBEAT_INTERVAL
            self._events.append(Joined(response))
            while self._outbox:
                self._transmits.append(self._outbox.popleft())
            return
        if ref == self._heartbeat_ref:
            self._heartbeat_ref = None
            self._missed = 0
            return
        self._events.append(Reply(ref, ok, response))

    def _close(self, now: float, reason: str) -> None:
        self._actions.append(Close(reason))
        self._lost(now, reason, None)

    def _lost(self, now: float, reason: str, retry_after: float | None) -> None:
        self.state = State.DISCONNECTED
        self._join_ref = None
        self._join_deadline = None
        self._next_heartbeat = None
        self._heartbeat_ref = None
        if self._disconnected_since is None:
            self._disconnected_since = now
        delay = self._backoff() if retry_after is None else max(0.0, retry_after)
        self._attempt += 1
        self._reconnect_at = now + delay
        self._events.append(Disconnected(reason, delay))

    def _backoff(self) -> float:
        base = min(BACKOFF_MAX, BACKOFF_INITIAL * BACKOFF_MULTIPLIER ** self._attempt)
        jitter = 1.0 + BACKOFF_JITTER * (2.0 * self.rng.random() - 1.0)
        return min(BACKOFF_MAX, base * jitter)

    def _stop(self, now: float, reason: str) -> None:
        if self.state is State.STOPPED:
            return
        if self.state in (State.JOINING, State.JOINED):
            self._actions.append(Close(reason))
        self.state = State.STOPPED
        self._reconnect_at = None
        self._events.append(Stopped(reason))
