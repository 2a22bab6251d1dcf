"""The portal's real-time side: WebSocket sessions for clients, gateways and relays.

Theory of operation
-------------------
Each device holds one WebSocket to ``/client``, ``/gateway`` or ``/relay`` and joins the topic of
the same name (Phoenix framing, see ``firezone.proto.phoenix``). The :class:`Hub` keeps presence
(who is online), the relays each session was given, and the live authorizations
``(client, resource) -> gateway``. Flows:

* client join  -> ``init {interface, resources, relays}``; resources are those some enabled policy
  of the user's groups names. Conditions (remote IP, provider, time window, verified device) are
  checked when the client asks for access, so a refusal can name the violated properties.
* ``request_authorization`` -> policy engine -> a random online gateway of the resource's site
  (one the client already uses first) -> ``create_authorization`` to it -> its
  ``authorization_created`` within 15 s -> ``authorization_created`` to the client; otherwise
  ``authorization_creation_failed {reason: not_found|forbidden|offline}``. Every decision is
  written to the audit log.
* store changes (resources, policies, memberships, users, tokens) re-evaluate what each client
  may reach: gained resources are pushed, lost ones are deleted on the client and
  ``reject_access`` is sent to the gateway that served them. A 60 s tick revokes authorizations
  whose expiry (token, end of a time window) has passed.
* relays join with their secret; every client and gateway holds credentials for two online
  relays, and a relay that leaves is replaced through ``relays_presence``.

Session writes go through a bounded queue drained by one writer task per session, so pushes are
synchronous for the hub and a stuck peer cannot block anyone else (it is dropped when its queue
fills).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Callable

from aiohttp import WSMsgType, web

from firezone.portal.domain import policies
from firezone.portal.domain.resources import filters_to_wire
from firezone.portal.errors import BadRequest, Conflict, Forbidden, NotFound, PortalError, Unauthorized
from firezone.portal.store import Change, Store, TokenInfo
from firezone.proto.turn.credentials import make_credentials

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 37.0  # seconds without any frame (heartbeats come every 10 s)
AUTHORIZATION_TIMEOUT = 15.0
REEVALUATE_INTERVAL = 60.0
MAX_FRAME = 64 * 1024
# Frames queued per session before it counts as stuck and is dropped; a gateway gets one frame per
# authorization of every client it serves, so it gets more room.
SEND_QUEUE = {"client": 4096, "gateway": 65536, "relay": 1024}
# Frames per second and burst per session: a gateway acknowledges for every client it serves.
RATE_LIMITS = {"client": (20.0, 60.0), "gateway": (20000.0, 40000.0), "relay": (10.0, 30.0)}
GATEWAY_RELAY_EXPIRY = 2145916800  # 2038-01-01: stable across gateway reconnects
CLIENT_RELAY_TTL = 7 * 24 * 3600
RELAYS_PER_PEER = 2


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def relay_id_for(secret: str) -> str:
    """A relay's id: UUID-formatted bits of SHA-256 over its secret (new secret -> new id)."""
    return str(uuid.UUID(bytes=hashlib.sha256(secret.encode()).digest()[:16], version=4))


def ice_credentials(client_id: str, client_pk: str, gateway_id: str, gateway_pk: str) -> tuple[dict[str, str], dict[str, str]]:
    """Deterministic per pair, so a reconnect with the same keys finds the same connection."""
    digest = hashlib.sha256(f"{client_id}:{client_pk}:{gateway_id}:{gateway_pk}".encode()).digest()
    text = base64.b32encode(digest).decode().rstrip("=").lower()
    return ({"username": text[0:4], "password": text[4:26]}, {"username": text[26:30], "password": text[30:52]})


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(eq=False)
class Session:
    kind: str
    token: TokenInfo
    remote_ip: str | None
    params: dict[str, str]
    user_agent: str
    account_id: str | None = None
    device: dict[str, Any] | None = None
    actor: dict[str, Any] | None = None
    ws: web.WebSocketResponse | None = None
    joined: bool = False
    relay_ids: list[str] = field(default_factory=list)
    visible: dict[str, dict[str, Any]] = field(default_factory=dict)  # resource id -> pushed JSON
    queue: asyncio.Queue[str | None] = field(init=False)
    bucket: TokenBucket | None = None
    relay_id: str | None = None
    relay_secret: str | None = None
    expiry_handle: asyncio.TimerHandle | None = None
    closed: bool = False
    connected_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(SEND_QUEUE[self.kind])

    @property
    def device_id(self) -> str:
        assert self.device is not None
        return str(self.device["id"])

    @property
    def public_key(self) -> str:
        return str(self.device["public_key"]) if self.device else ""

    def push(self, event: str, payload: Any, ref: str | None = None, topic: str | None = None) -> None:
        self._put(_frame(topic or self.kind, event, payload, ref))

    def push_frame(self, frame: str) -> None:
        """Queue an already serialized frame (one serialization for a broadcast)."""
        self._put(frame)

    def reply(self, ref: Any, ok: bool, response: Any = None, topic: str | None = None) -> None:
        self.push("phx_reply", {"status": "ok" if ok else "error", "response": response if response is not None else {}},
                  ref=ref if isinstance(ref, str) else None, topic=topic)

    def _put(self, frame: str | None) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("session send queue full; dropping the session", extra={"kind": self.kind})
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
            if self.ws is not None:
                asyncio.get_event_loop().create_task(self.ws.close())

    def disconnect(self, reason: str) -> None:
        """Tell the peer why (it stops reconnecting), then close."""
        if self.closed:
            return
        self._put(json.dumps({"topic": self.kind, "event": "disconnect", "payload": {"reason": reason}, "ref": None}))
        self.closed = True
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            pass


@dataclass
class Authorization:
    client_id: str
    resource_id: str
    gateway_id: str
    expires_at: float | None
    policy_id: str | None


@dataclass
class Pending:
    ref: str
    client: Session
    resource: dict[str, Any]
    gateway_id: str
    decision: policies.Decision
    expires_at: float | None
    client_ref: str | None
    timer: asyncio.TimerHandle | None = None


class Hub:
    def __init__(self, store: Store, *, secret_key: bytes, rng: random.Random | None = None,
                 reevaluate_interval: float = REEVALUATE_INTERVAL,
                 authorization_timeout: float = AUTHORIZATION_TIMEOUT,
                 on_session_count: Callable[[str, int], None] | None = None) -> None:
        self.store = store
        self.secret_key = secret_key
        self.rng = rng or random.SystemRandom()
        self.reevaluate_interval = reevaluate_interval
        self.authorization_timeout = authorization_timeout
        self.clients: dict[str, Session] = {}
        self.gateways: dict[str, Session] = {}
        self.relays: dict[str, Session] = {}
        self.authorizations: dict[tuple[str, str], Authorization] = {}
        self.pending: dict[str, Pending] = {}
        self._on_session_count = on_session_count
        self._ticker: asyncio.Task[None] | None = None
        store.subscribe(self.on_change)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker = asyncio.get_event_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        for s in [*self.clients.values(), *self.gateways.values(), *self.relays.values()]:
            s.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.reevaluate_interval)
            try:
                self.reevaluate_all()
            except Exception:  # noqa: BLE001 - the periodic check must survive a bad row
                log.exception("periodic policy re-evaluation failed")

    def _count(self, kind: str) -> None:
        if self._on_session_count:
            self._on_session_count(kind, len({"client": self.clients, "gateway": self.gateways,
                                               "relay": self.relays}[kind]))

    # -- connect --------------------------------------------------------------------------------

    def authenticate(self, kind: str, presented: str | None, query: dict[str, str], remote_ip: str | None,
                     user_agent: str) -> Session:
        """Check the token and connect parameters before the WebSocket upgrade."""
        info = self.store.verify_token(presented, (kind,))
        s = Session(kind, info, remote_ip, dict(query), user_agent)
        s.bucket = TokenBucket(*RATE_LIMITS[kind], time.monotonic())
        if kind == "relay":
            return s
        assert info.account_id is not None
        account = self.store.account(info.account_id)
        if account["disabled"]:
            raise Forbidden("the account is disabled")
        s.account_id = info.account_id
        pk = query.get("public_key", "")
        try:
            if len(base64.b64decode(pk, validate=True)) != 32:
                raise ValueError
        except ValueError:
            raise BadRequest("public_key: must be a base64 X25519 public key (44 characters)") from None
        external_id = query.get("external_id") or ""
        if not external_id or len(external_id) > 255:
            raise BadRequest("external_id: required, at most 255 characters")
        name = (query.get("name") or external_id)[:255]
        if kind == "client":
            if info.actor_id is None:
                raise Unauthorized("this client token does not belong to a user")
            actor = self.store.actor(info.account_id, info.actor_id)
            if actor["disabled"]:
                raise Forbidden("the user is disabled")
            s.actor = actor
            s.device = self.store.upsert_device(info.account_id, type="client", external_id=external_id, name=name,
                                                public_key=pk, actor_id=actor["id"], remote_ip=remote_ip,
                                                version=_version(user_agent))
        else:
            existing = self.store.db.fetchone(
                "SELECT id FROM devices WHERE account_id = :a AND type = 'gateway' AND external_id = :x",
                {"a": info.account_id, "x": external_id})
            if existing is not None and existing["id"] in self.gateways and not self.gateways[existing["id"]].closed:
                raise Conflict("a gateway with this id is already connected")
            s.device = self.store.upsert_device(info.account_id, type="gateway", external_id=external_id, name=name,
                                                public_key=pk, site_id=info.site_id, remote_ip=remote_ip,
                                                version=_version(user_agent))
        return s

    # -- frames ---------------------------------------------------------------------------------

    def handle_frame(self, s: Session, text: str) -> None:
        now = time.monotonic()
        try:
            msg = json.loads(text)
        except ValueError:
            s.reply(None, False, {"reason": "malformed_frame"})
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            s.reply(None, False, {"reason": "malformed_frame"})
            return
        topic, event, payload, ref = msg.get("topic"), msg["event"], msg.get("payload"), msg.get("ref")
        if ref is not None and not isinstance(ref, str):
            ref = str(ref)
        if topic == "phoenix" and event == "heartbeat":
            s.reply(ref, True, topic="phoenix")
            return
        assert s.bucket is not None
        if not s.bucket.take(now):
            s.reply(ref, False, {"reason": "rate_limited"}, topic=topic if isinstance(topic, str) else None)
            return
        if topic != s.kind:
            s.reply(ref, False, {"reason": "unknown_topic"}, topic=topic if isinstance(topic, str) else None)
            return
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            s.reply(ref, False, {"reason": "malformed_payload"})
            return
        if event == "phx_join":
            if s.joined:
                s.reply(ref, False, {"reason": "already_joined"})
                return
            self._join(s, payload, ref)
            return
        if not s.joined:
            s.reply(ref, False, {"reason": "not_joined"})
            return
        if event == "phx_leave":
            s.reply(ref, True)
            s.close()
            return
        handler = _HANDLERS.get((s.kind, event))
        if handler is None:
            s.reply(ref, False, {"reason": "unknown_message"})
            return
        try:
            handler(self, s, payload, ref)
        except (KeyError, TypeError, ValueError) as e:
            s.reply(ref, False, {"reason": "invalid_payload", "detail": str(e)})

    def _join(self, s: Session, payload: dict[str, Any], ref: str | None) -> None:
        if s.kind == "relay":
            secret = payload.get("stamp_secret")
            if not isinstance(secret, str) or len(secret) != 64 or any(c not in "0123456789abcdef" for c in secret):
                s.reply(ref, False, {"reason": "invalid_stamp_secret"})
                return
            s.relay_secret = secret
            s.relay_id = relay_id_for(secret)
            old = self.relays.get(s.relay_id)
            if old is not None and old is not s:
                old.close()
            self.relays[s.relay_id] = s
            s.joined = True
            s.reply(ref, True, {"relay_id": s.relay_id})
            s.push("init", {})
            log.info("relay online", extra={"relay_id": s.relay_id})
            self._count("relay")
            self._relay_joined(s.relay_id)
            return
        if s.kind == "client":
            old = self.clients.get(s.device_id)
            if old is not None and old is not s:
                self._forget_session(old)
                old.close()
            self.clients[s.device_id] = s
            s.joined = True
            s.relay_ids = self._pick_relays([])
            s.visible = {r["id"]: self._client_resource(r) for r in self._connectable_resources(s)}
            s.reply(ref, True)
            s.push("init", self._client_init(s))
            self._schedule_expiry(s)
            log.info("client online", extra={"device_id": s.device_id, "actor": s.actor["id"] if s.actor else None})
            self._count("client")
            return
        # gateway
        self.gateways[s.device_id] = s
        s.joined = True
        s.relay_ids = self._pick_relays([])
        s.reply(ref, True)
        account = self.store.account(s.account_id or "")
        s.push("init", {"interface": {"ipv4": s.device["ipv4"], "ipv6": s.device["ipv6"]} if s.device else {},
                        "relays": self._relays_json(s, s.relay_ids), "account_slug": account["slug"],
                        "authorizations": [{"client_id": a.client_id, "resource_id": a.resource_id,
                                            "expires_at": a.expires_at}
                                           for a in self.authorizations.values() if a.gateway_id == s.device_id],
                        "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True}})
        self._schedule_expiry(s)
        log.info("gateway online", extra={"device_id": s.device_id, "site_id": s.token.site_id})
        self._count("gateway")

    def leave(self, s: Session) -> None:
        """The WebSocket is gone."""
        s.closed = True
        if s.expiry_handle is not None:
            s.expiry_handle.cancel()
        if not s.joined:
            return
        self._forget_session(s)

    def _forget_session(self, s: Session) -> None:
        if s.kind == "relay" and s.relay_id and self.relays.get(s.relay_id) is s:
            del self.relays[s.relay_id]
            log.info("relay offline", extra={"relay_id": s.relay_id})
            self._count("relay")
            self._relay_left(s.relay_id)
        elif s.kind == "client" and self.clients.get(s.device_id) is s:
            del self.clients[s.device_id]
            for ref, p in list(self.pending.items()):
                if p.client is s:
                    self._drop_pending(ref)
            self._count("client")
            log.info("client offline", extra={"device_id": s.device_id})
        elif s.kind == "gateway" and self.gateways.get(s.device_id) is s:
            del self.gateways[s.device_id]
            for ref, p in list(self.pending.items()):
                if p.gateway_id == s.device_id:
                    self._fail_pending(ref, "offline")
            self._count("gateway")
            log.info("gateway offline", extra={"device_id": s.device_id})

    def _schedule_expiry(self, s: Session) -> None:
        exp = s.token.expires_at
        if exp is None:
            return
        loop = asyncio.get_event_loop()
        delay = max(0.0, exp / 1000 - time.time())
        s.expiry_handle = loop.call_later(delay, self._expire, s)

    def _expire(self, s: Session) -> None:
        log.info("session token expired", extra={"kind": s.kind})
        if s.kind == "client":
            self._revoke_all_for_client(s)
        s.disconnect("token_expired")

    # -- relays ---------------------------------------------------------------------------------

    def _pick_relays(self, keep: list[str]) -> list[str]:
        chosen = [r for r in keep if r in self.relays]
        others = [r for r in self.relays if r not in chosen]
        self.rng.shuffle(others)
        return (chosen + others)[:RELAYS_PER_PEER]

    def _relays_json(self, s: Session, relay_ids: list[str]) -> list[dict[str, Any]]:
        if s.kind == "gateway":
            expiry = GATEWAY_RELAY_EXPIRY
        else:
            expiry = int(s.token.expires_at / 1000) if s.token.expires_at else int(time.time()) + CLIENT_RELAY_TTL
        out = []
        for rid in relay_ids:
            r = self.relays.get(rid)
            if r is None or r.relay_secret is None:
                continue
            user, pw = make_credentials(r.relay_secret, s.public_key, expiry)
            port = _int(r.params.get("port"), 3478)
            for fam in ("ipv4", "ipv6"):
                ip = r.params.get(fam)
                if not ip:
                    continue
                addr = f"[{ip}]:{port}" if fam == "ipv6" else f"{ip}:{port}"
                out.append({"id": rid, "type": "turn", "addr": addr, "username": user, "password": pw,
                            "expires_at": expiry})
        return out

    def _peer_sessions(self) -> list[Session]:
        return [*self.clients.values(), *self.gateways.values()]

    def _relay_joined(self, rid: str) -> None:
        for s in self._peer_sessions():
            if len(s.relay_ids) < RELAYS_PER_PEER and rid not in s.relay_ids:
                s.relay_ids.append(rid)
                s.push("relays_presence", {"disconnected_ids": [], "connected": self._relays_json(s, [rid])})

    def _relay_left(self, rid: str) -> None:
        for s in self._peer_sessions():
            if rid in s.relay_ids:
                s.relay_ids.remove(rid)
                new = [r for r in self._pick_relays(s.relay_ids) if r not in s.relay_ids]
                s.relay_ids += new
                s.push("relays_presence", {"disconnected_ids": [rid], "connected": self._relays_json(s, new)})

    # -- resources a client may reach ------------------------------------------------------------

    def _ctx(self, s: Session) -> policies.EvalContext:
        exp = s.token.expires_at
        return policies.EvalContext(
            now=datetime.now(UTC), remote_ip=s.remote_ip, provider_id=s.token.provider_id,
            client_verified=bool(s.device and s.device.get("verified_at")),
            token_expires_at=datetime.fromtimestamp(exp / 1000, UTC) if exp else None)

    def _connectable_resources(self, s: Session, only: set[str] | None = None) -> list[dict[str, Any]]:
        """Resources some enabled policy of the actor's groups names.

        Conditions are not applied here but when the client asks for access: a client whose
        conditions fail (wrong network, outside the time window) still knows the resource, so its
        request is refused with the violated properties, audited, and shown to the user. A
        resource no policy of the user's groups names stays invisible to the client.
        """
        assert s.actor is not None
        ids = self.store.accessible_resource_ids(s.actor["id"])
        if only is not None:
            ids &= only
        return self.store.resources_by_ids(s.account_id or "", list(ids))

    @staticmethod
    def _client_resource(r: dict[str, Any]) -> dict[str, Any]:
        sites = [{"id": r["site_id"], "name": r.get("site_name")}]
        if r["type"] == "internet":
            return {"id": r["id"], "type": "internet", "name": r["name"], "can_be_disabled": True, "sites": sites}
        address, rtype = r["address"], r["type"]
        if rtype == "ip":
            ip = ipaddress.ip_address(address)
            address, rtype = f"{ip}/{ip.max_prefixlen}", "cidr"
        return {"id": r["id"], "type": rtype, "name": r["name"], "address": address,
                "address_description": r.get("address_description"), "filters": filters_to_wire(r["filters"]),
                "sites": sites}

    @staticmethod
    def _gateway_resource(r: dict[str, Any]) -> dict[str, Any]:
        if r["type"] == "internet":
            return {"id": r["id"], "type": "internet"}
        address, rtype = r["address"], r["type"]
        if rtype == "ip":
            ip = ipaddress.ip_address(address)
            address, rtype = f"{ip}/{ip.max_prefixlen}", "cidr"
        return {"id": r["id"], "type": rtype, "name": r["name"], "address": address,
                "filters": filters_to_wire(r["filters"])}

    def _client_init(self, s: Session) -> dict[str, Any]:
        settings = self.store.account_settings(s.account_id or "")
        assert s.device is not None
        return {"interface": {"ipv4": s.device["ipv4"], "ipv6": s.device["ipv6"],
                              "search_domain": settings.get("search_domain"),
                              "upstream_dns": [{"protocol": "ip_port", "address": a}
                                               for a in settings.get("upstream_dns", [])]},
                "resources": list(s.visible.values()),
                "relays": self._relays_json(s, s.relay_ids)}

    def refresh_client(self, s: Session, only: set[str] | None = None) -> None:
        """Re-evaluate what the client may reach; push the difference; revoke what it lost."""
        if not s.joined or s.closed:
            return
        allowed = {r["id"]: self._client_resource(r) for r in self._connectable_resources(s, only)}
        scope = set(s.visible) if only is None else (set(s.visible) & only)
        for rid in scope - set(allowed):
            del s.visible[rid]
            s.push("resource_deleted", rid)
            self._revoke(s.device_id, rid, "access removed")
        for rid, view in allowed.items():
            if s.visible.get(rid) != view:
                s.visible[rid] = view
                s.push("resource_created_or_updated", view)

    def reevaluate_all(self) -> None:
        for s in list(self.clients.values()):
            self.refresh_client(s)
        now = time.time()
        for key, a in list(self.authorizations.items()):
            if a.expires_at is not None and a.expires_at <= now:
                self._revoke(a.client_id, a.resource_id, "authorization expired")

    # -- authorizations -------------------------------------------------------------------------

    def request_authorization(self, s: Session, payload: dict[str, Any], ref: str | None) -> None:
        rid = payload["resource_id"]
        if not isinstance(rid, str):
            raise TypeError("resource_id must be a string")
        connected = payload.get("connected_gateway_ids") or []
        if not isinstance(connected, list):
            raise TypeError("connected_gateway_ids must be a list")
        assert s.actor is not None and s.account_id is not None
        s.reply(ref, True)
        try:
            resource = self.store.resource(s.account_id, rid) if _is_uuid(rid) else None
        except NotFound:
            resource = None
        if resource is None:
            self.store.record_decision(s.account_id, result="deny", reason="not_found", actor=s.actor, resource=None,
                                       device_id=s.device_id, remote_ip=s.remote_ip)
            s.push("authorization_creation_failed", {"resource_id": rid, "reason": "not_found"})
            return
        decision = self.store.decide(s.actor["id"], rid, self._ctx(s))
        if not decision.allowed and decision.reason in (policies.REASON_NO_POLICY, policies.REASON_DISABLED):
            # Default deny. The client is told "not_found", as for an unknown id, so a request
            # does not confirm that a resource it was never offered exists; the audit names it.
            self.store.record_decision(s.account_id, result="deny", reason="no_policy", actor=s.actor,
                                       resource=resource, device_id=s.device_id, remote_ip=s.remote_ip)
            s.push("authorization_creation_failed", {"resource_id": rid, "reason": "not_found"})
            return
        if not decision.allowed:  # some policy names it, but its conditions do not hold
            self.store.record_decision(s.account_id, result="deny", reason="forbidden", actor=s.actor,
                                       resource=resource, device_id=s.device_id,
                                       violated=decision.violated_properties, remote_ip=s.remote_ip)
            s.push("authorization_creation_failed", {"resource_id": rid, "reason": "forbidden",
                                                     "violated_properties": list(decision.violated_properties)})
            return
        online = [g for g in self.gateways.values()
                  if g.joined and not g.closed and g.token.site_id == resource["site_id"]]
        if not online:
            self.store.record_decision(s.account_id, result="deny", reason="offline", actor=s.actor,
                                       resource=resource, device_id=s.device_id, policy_id=decision.policy_id,
                                       remote_ip=s.remote_ip)
            s.push("authorization_creation_failed", {"resource_id": rid, "reason": "offline"})
            return
        preferred = [g for g in online if g.device_id in connected]
        gw = self.rng.choice(preferred or online)
        expires = decision.expires_at.timestamp() if decision.expires_at else None
        psk = self._psk(s, gw)
        client_ice, gateway_ice = ice_credentials(s.device_id, s.public_key, gw.device_id, gw.public_key)
        gref = str(uuid.uuid4())
        pending = Pending(gref, s, resource, gw.device_id, decision, expires, ref)
        pending.timer = asyncio.get_event_loop().call_later(self.authorization_timeout, self._fail_pending, gref,
                                                            "offline")
        self.pending[gref] = pending
        assert s.device is not None
        gw.push("create_authorization", {
            "ref": gref, "resource": self._gateway_resource(resource),
            "client": {"id": s.device_id, "public_key": s.public_key, "ipv4": s.device["ipv4"],
                       "ipv6": s.device["ipv6"], "preshared_key": psk},
            "subject": {"actor_id": s.actor["id"], "actor_email": s.actor["email"], "actor_name": s.actor["name"]},
            "preshared_key": psk, "client_ice_credentials": client_ice, "gateway_ice_credentials": gateway_ice,
            "expires_at": int(expires) if expires else None})

    def _psk(self, client: Session, gateway: Session) -> str:
        msg = f"WG_PSK|C_ID:{client.device_id}|G_ID:{gateway.device_id}|C_PK:{client.public_key}|G_PK:{gateway.public_key}"
        return _b64(hmac.new(self.secret_key, msg.encode(), hashlib.sha256).digest())

    def authorization_created(self, gw: Session, payload: dict[str, Any], ref: str | None) -> None:
        gref = payload["ref"]
        p = self.pending.get(gref) if isinstance(gref, str) else None
        if p is None or p.gateway_id != gw.device_id:
            gw.reply(ref, False, {"reason": "unknown_ref"})
            return
        gw.reply(ref, True)
        self._drop_pending(gref)
        s = p.client
        if s.closed or s.actor is None or s.account_id is None:
            return
        self.authorizations[(s.device_id, p.resource["id"])] = Authorization(
            s.device_id, p.resource["id"], gw.device_id, p.expires_at, p.decision.policy_id)
        self.store.record_decision(s.account_id, result="allow", reason="allowed", actor=s.actor, resource=p.resource,
                                   device_id=s.device_id, gateway_id=gw.device_id, policy_id=p.decision.policy_id,
                                   remote_ip=s.remote_ip)
        client_ice, gateway_ice = ice_credentials(s.device_id, s.public_key, gw.device_id, gw.public_key)
        assert gw.device is not None
        s.push("authorization_created", {
            "resource_id": p.resource["id"], "site_id": p.resource["site_id"], "gateway_id": gw.device_id,
            "gateway_public_key": gw.public_key, "gateway_ipv4": gw.device["ipv4"], "gateway_ipv6": gw.device["ipv6"],
            "preshared_key": self._psk(s, gw), "client_ice_credentials": client_ice,
            "gateway_ice_credentials": gateway_ice, "expires_at": int(p.expires_at) if p.expires_at else None})

    def _drop_pending(self, gref: str) -> Pending | None:
        p = self.pending.pop(gref, None)
        if p is not None and p.timer is not None:
            p.timer.cancel()
        return p

    def _fail_pending(self, gref: str, reason: str) -> None:
        p = self._drop_pending(gref)
        if p is None or p.client.closed or p.client.account_id is None:
            return
        self.store.record_decision(p.client.account_id, result="deny", reason=reason, actor=p.client.actor,
                                   resource=p.resource, device_id=p.client.device_id, gateway_id=p.gateway_id,
                                   policy_id=p.decision.policy_id, remote_ip=p.client.remote_ip)
        p.client.push("authorization_creation_failed", {"resource_id": p.resource["id"], "reason": reason})

    def _revoke(self, client_id: str, resource_id: str, why: str) -> None:
        a = self.authorizations.pop((client_id, resource_id), None)
        if a is None:
            return
        gw = self.gateways.get(a.gateway_id)
        log.info("authorization revoked", extra={"client_id": client_id, "resource_id": resource_id, "reason": why})
        if gw is not None:
            gw.push("reject_access", {"client_id": client_id, "resource_id": resource_id})

    def _revoke_all_for_client(self, s: Session) -> None:
        for cid, rid in [k for k in self.authorizations if k[0] == s.device_id]:
            self._revoke(cid, rid, "session ended")

    # -- ICE candidates -------------------------------------------------------------------------

    def _linked(self, client_id: str, gateway_id: str) -> bool:
        return any(a.gateway_id == gateway_id for (c, _), a in self.authorizations.items() if c == client_id) or any(
            p.client.device.get("id") == client_id and p.gateway_id == gateway_id
            for p in self.pending.values() if p.client.device)

    def client_candidates(self, s: Session, payload: dict[str, Any], ref: str | None, invalidate: bool) -> None:
        gid, cands = payload["gateway_id"], _candidates(payload["candidates"])
        if not self._linked(s.device_id, gid) or gid not in self.gateways:
            s.reply(ref, False, {"reason": "not_authorized"})
            return
        s.reply(ref, True)
        self.gateways[gid].push("invalidate_ice_candidates" if invalidate else "ice_candidates",
                                {"client_id": s.device_id, "candidates": cands})

    def gateway_candidates(self, gw: Session, payload: dict[str, Any], ref: str | None, invalidate: bool) -> None:
        ids = payload.get("client_ids")
        if ids is None:
            ids = [payload["client_id"]]
        if not isinstance(ids, list):
            raise TypeError("client_ids must be a list")
        cands = _candidates(payload["candidates"])
        gw.reply(ref, True)
        for cid in ids:
            c = self.clients.get(cid) if isinstance(cid, str) else None
            if c is not None and self._linked(cid, gw.device_id):
                c.push("invalidate_ice_candidates" if invalidate else "ice_candidates",
                       {"gateway_id": gw.device_id, "candidates": cands})

    # -- store changes --------------------------------------------------------------------------

    def on_change(self, ch: Change) -> None:
        clients = [s for s in self.clients.values() if s.account_id == ch.account_id]
        if ch.kind == "resource":
            if ch.action in ("updated", "deleted"):
                before, after = ch.before or {}, ch.row or {}
                moved = ch.action == "deleted" or any(before.get(k) != after.get(k)
                                                      for k in ("address", "type", "site_id"))
                for (cid, rid), a in list(self.authorizations.items()):
                    if rid != ch.id:
                        continue
                    if moved:
                        self._revoke(cid, rid, f"resource {ch.action}")
                    elif before.get("filters") != after.get("filters") and a.gateway_id in self.gateways:
                        self.gateways[a.gateway_id].push("resource_updated", self._gateway_resource(after))
            if ch.action == "updated" and ch.row is not None:
                # Access follows policies, which did not change: only the view of who sees it changes.
                view = self._client_resource(ch.row)
                frame = _frame("client", "resource_created_or_updated", view)
                for s in clients:
                    if ch.id in s.visible and s.visible[ch.id] != view:
                        s.visible[ch.id] = view
                        s.push_frame(frame)
            elif ch.action == "deleted":
                frame = _frame("client", "resource_deleted", ch.id)
                for s in clients:
                    if s.visible.pop(ch.id, None) is not None:
                        s.push_frame(frame)
        elif ch.kind == "policy":
            p = ch.row or ch.before or {}
            members = self._group_members(p.get("group_id"))
            for s in clients:
                if s.actor and s.actor["id"] in members:
                    self.refresh_client(s, {p["resource_id"]})
        elif ch.kind == "group":
            resource_ids = set((ch.before or {}).get("resource_ids", ()))
            if resource_ids:
                for s in clients:
                    self.refresh_client(s, resource_ids)
        elif ch.kind == "membership":
            actor_id = (ch.row or ch.before or {}).get("actor_id")
            for s in clients:
                if s.actor and s.actor["id"] == actor_id:
                    self.refresh_client(s)
        elif ch.kind == "actor" and ch.action in ("updated", "deleted"):
            for s in clients:
                if s.actor and s.actor["id"] == ch.id:
                    if ch.action == "deleted" or (ch.row and ch.row["disabled"]):
                        self._revoke_all_for_client(s)
                        s.disconnect("actor_disabled" if ch.action == "updated" else "actor_deleted")
                    else:
                        s.actor = ch.row
        elif ch.kind == "token" and ch.action == "revoked":
            for s in [*self.clients.values(), *self.gateways.values(), *self.relays.values()]:
                if s.token.id == ch.id:
                    if s.kind == "client":
                        self._revoke_all_for_client(s)
                    s.disconnect("token_expired")
        elif ch.kind == "account":
            for s in clients:
                s.push("config_changed", {"interface": self._client_init(s)["interface"]})

    def _group_members(self, group_id: str | None) -> set[str]:
        if group_id is None:
            return set()
        rows = self.store.db.fetchall("SELECT actor_id FROM memberships WHERE group_id = :g", {"g": group_id})
        return {r["actor_id"] for r in rows}

    # -- presence for the admin API --------------------------------------------------------------

    def online_devices(self) -> set[str]:
        return {*self.clients, *self.gateways}

    def relay_list(self) -> list[dict[str, Any]]:
        return [{"id": rid, "name": s.params.get("name") or rid[:8], "ipv4": s.params.get("ipv4"),
                 "ipv6": s.params.get("ipv6"), "port": _int(s.params.get("port"), 3478),
                 "remote_ip": s.remote_ip, "version": _version(s.user_agent), "online_since": iso(s.connected_at)}
                for rid, s in self.relays.items()]


def _frame(topic: str, event: str, payload: Any, ref: str | None = None) -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}, default=str)


def _candidates(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 64 or not all(isinstance(c, str) and len(c) < 512 for c in value):
        raise ValueError("candidates must be a list of at most 64 candidate strings")
    return value


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _is_uuid(v: str) -> bool:
    try:
        uuid.UUID(v)
        return True
    except ValueError:
        return False


def _version(user_agent: str) -> str | None:
    # "<os>/<os version> <component>/<version> (...)"
    parts = user_agent.split()
    if len(parts) >= 2 and "/" in parts[1]:
        return parts[1].split("/", 1)[1][:32]
    return None


_HANDLERS: dict[tuple[str, str], Callable[[Hub, Session, dict[str, Any], str | None], None]] = {
    ("client", "request_authorization"): Hub.request_authorization,
    ("client", "new_ice_candidates"): lambda h, s, p, r: h.client_candidates(s, p, r, False),
    ("client", "new_gateway_ice_candidates"): lambda h, s, p, r: h.client_candidates(s, p, r, False),
    ("client", "invalidate_ice_candidates"): lambda h, s, p, r: h.client_candidates(s, p, r, True),
    ("client", "invalidate_gateway_ice_candidates"): lambda h, s, p, r: h.client_candidates(s, p, r, True),
    ("gateway", "authorization_created"): Hub.authorization_created,
    ("gateway", "new_ice_candidates"): lambda h, s, p, r: h.gateway_candidates(s, p, r, False),
    ("gateway", "broadcast_ice_candidates"): lambda h, s, p, r: h.gateway_candidates(s, p, r, False),
    ("gateway", "invalidate_ice_candidates"): lambda h, s, p, r: h.gateway_candidates(s, p, r, True),
    ("gateway", "broadcast_invalidated_ice_candidates"): lambda h, s, p, r: h.gateway_candidates(s, p, r, True),
}


# -- aiohttp endpoints ----------------------------------------------------------------------------

HUB = web.AppKey("hub", Hub)


def _presented_token(request: web.Request) -> str | None:
    for header in ("Authorization", "X-Authorization"):
        v = request.headers.get(header, "")
        if v[:7].lower() == "bearer ":
            return v[7:].strip() or None
    return None


async def _writer(s: Session) -> None:
    assert s.ws is not None
    while True:
        frame = await s.queue.get()
        if frame is None:
            break
        try:
            await s.ws.send_str(frame)
        except (ConnectionError, RuntimeError):
            break
    if not s.ws.closed:
        await s.ws.close()


def endpoint(kind: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        from firezone.portal.web.app import problem

        hub = request.app[HUB]
        remote = request.remote
        try:
            s = hub.authenticate(kind, _presented_token(request), dict(request.query), remote,
                                 request.headers.get("User-Agent", ""))
        except PortalError as e:
            return problem(e.status, e.title, e.detail, e.errors)
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, autoping=True, heartbeat=None)
        await ws.prepare(request)
        s.ws = ws
        writer = asyncio.get_event_loop().create_task(_writer(s))
        try:
            while not s.closed:
                try:
                    msg = await ws.receive(timeout=IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    log.info("session idle; closing", extra={"kind": kind})
                    break
                if msg.type is WSMsgType.TEXT:
                    hub.handle_frame(s, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    s.reply(None, False, {"reason": "binary_frames_not_supported"})
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        finally:
            hub.leave(s)
            s.closed = True
            if not s.queue.full():
                s.queue.put_nowait(None)
            try:
                await asyncio.wait_for(writer, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                writer.cancel()
            if not ws.closed:
                await ws.close()
        return ws

    handler.__name__ = f"{kind}_socket"
    return handler


def install(app: web.Application, hub: Hub) -> None:
    app[HUB] = hub
    for kind in ("client", "gateway", "relay"):
        app.router.add_get(f"/{kind}", endpoint(kind))

    async def on_startup(_app: web.Application) -> None:
        hub.start()

    async def on_cleanup(_app: web.Application) -> None:
        await hub.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
