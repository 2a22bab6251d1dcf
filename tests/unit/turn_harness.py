"""In-memory harness for TurnServer tests: a scripted client, a virtual clock, command capture."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from firezone.proto.rng import SeededRng
from firezone.proto.stun import Attr, Class, Message, Method, long_term_key, parse_message
from firezone.proto.turn import (
    Command,
    SendToClient,
    TurnServer,
    make_credentials,
)

SECRET = bytes(range(32))
NOW0 = 1000.0
UNIX0 = 1_700_000_000.0
PUB4 = "203.0.113.1"
PUB6 = "2001:db8::1"
CLIENT = ("198.51.100.7", 40000)
CLIENT6 = ("2001:db8:aaaa::7", 40000)
PEER = ("192.0.2.10", 5000)
PEER6 = ("2001:db8:bbbb::10", 5000)


def make_server(**kw: Any) -> TurnServer:
    args: dict[str, Any] = {
        "secret": SECRET,
        "public_ip4": PUB4,
        "public_ip6": PUB6,
        "rng": SeededRng(7),
        "now": NOW0,
        "unix_time": UNIX0,
    }
    args.update(kw)
    return TurnServer(**args)


def drain(server: TurnServer) -> list[Command]:
    out = []
    while (cmd := server.poll_command()) is not None:
        out.append(cmd)
    return out


class Client:
    """A TURN client scripted by the test; every call returns the parsed reply (or None)."""

    def __init__(
        self,
        server: TurnServer,
        addr: tuple[str, int] = CLIENT,
        *,
        public_key: str = "cGVlci1wdWJsaWMta2V5",
        expires: int = int(UNIX0) + 86400,
        secret: bytes | str = SECRET,
    ) -> None:
        self.server = server
        self.addr = addr
        self.username, self.password = make_credentials(secret, public_key, expires)
        self.realm = "firezone"
        self.nonce: str | None = None
        self.commands: list[Command] = []
        self._n = 0

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def tid(self) -> bytes:
        self._n += 1
        return self._n.to_bytes(4, "big") + self.addr[1].to_bytes(8, "big")

    def send_raw(self, data: bytes, now: float) -> list[Command]:
        self.server.handle_client_datagram(data, self.addr, now)
        self.commands = drain(self.server)
        return self.commands

    def replies(self) -> list[Message]:
        return [
            parse_message(c.data)
            for c in self.commands
            if isinstance(c, SendToClient) and c.client == self.addr
        ]

    def reply(self) -> Message:
        got = self.replies()
        assert len(got) == 1, got
        return got[0]

    def build(
        self, method: Method, attrs: Sequence[tuple[int, Any]] = (), *, tid: bytes | None = None
    ) -> Message:
        msg = Message(method, Class.REQUEST, tid or self.tid(), list(attrs))
        msg.add(Attr.USERNAME, self.username).add(Attr.REALM, self.realm).add(
            Attr.NONCE, self.nonce or ""
        )
        return msg

    def request(
        self,
        method: Method,
        attrs: Sequence[tuple[int, Any]] = (),
        now: float = NOW0,
        *,
        tid: bytes | None = None,
        retry_stale: bool = True,
    ) -> Message:
        """Authenticated request; fetches a nonce first (401 challenge) and retries once on 438."""
        if self.nonce is None:
            self.send_raw(Message(method, Class.REQUEST, self.tid(), list(attrs)).encode(), now)
            challenge = self.reply()
            assert challenge.get(Attr.ERROR_CODE).code == 401
            self.nonce = challenge.get(Attr.NONCE)
        self.send_raw(self.build(method, attrs, tid=tid).encode(key=self.key), now)
        resp = self.reply()
        if retry_stale and error_code(resp) == 438:
            self.nonce = resp.get(Attr.NONCE)
            self.send_raw(self.build(method, attrs, tid=tid).encode(key=self.key), now)
            resp = self.reply()
        return resp

    def allocate(self, now: float = NOW0, attrs: Sequence[tuple[int, Any]] = ()) -> Message:
        return self.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17), *attrs], now)

    def relayed(self, msg: Message) -> tuple[str, int]:
        return msg.get(Attr.XOR_RELAYED_ADDRESS)  # type: ignore[no-any-return]


def error_code(msg: Message) -> int | None:
    ec = msg.get(Attr.ERROR_CODE)
    return None if ec is None else ec.code
