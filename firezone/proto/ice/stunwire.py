"""The few STUN messages ICE needs, built and read through :mod:`firezone.proto.stun`."""

from __future__ import annotations

from dataclasses import dataclass

from firezone.proto.stun import (
    Attr,
    Class,
    ErrorCode,
    Message,
    Method,
    parse_message,
    verify_integrity,
)
from firezone.proto.stun.attributes import REASONS

from .candidate import Addr

BINDING = Method.BINDING


@dataclass(slots=True)
class Parsed:
    """A parsed Binding message with the ICE attributes pulled out."""

    msg: Message
    method: int
    transaction_id: bytes
    is_request: bool
    is_response: bool
    is_error: bool
    username: str | None
    priority: int | None
    use_candidate: bool
    ice_controlling: int | None
    ice_controlled: int | None
    mapped_address: Addr | None
    error_code: int | None

    def verify(self, key: bytes) -> bool:
        return verify_integrity(self.msg, key)


def parse(data: bytes) -> Parsed:
    """Parse a STUN datagram; ``ValueError`` (a ``ParseError``) on malformed input."""
    m = parse_message(data)
    ec = m.get(Attr.ERROR_CODE)
    return Parsed(
        msg=m,
        method=int(m.method),
        transaction_id=m.transaction_id,
        is_request=m.cls == Class.REQUEST,
        is_response=m.cls in (Class.SUCCESS, Class.ERROR),
        is_error=m.cls == Class.ERROR,
        username=m.get(Attr.USERNAME),
        priority=m.get(Attr.PRIORITY),
        use_candidate=Attr.USE_CANDIDATE in m,
        ice_controlling=m.get(Attr.ICE_CONTROLLING),
        ice_controlled=m.get(Attr.ICE_CONTROLLED),
        mapped_address=m.get(Attr.XOR_MAPPED_ADDRESS) or m.get(Attr.MAPPED_ADDRESS),
        error_code=ec.code if ec is not None else None,
    )


def binding_request(
    txid: bytes,
    *,
    username: str,
    key: bytes,
    priority: int,
    controlling: bool,
    tiebreaker: int,
    use_candidate: bool,
) -> bytes:
    """RFC 8445 §7.1.1: USERNAME, PRIORITY, ICE-CONTROLLING/-CONTROLLED, [USE-CANDIDATE], MI, FP."""
    m = Message(Method.BINDING, Class.REQUEST, txid)
    m.add(Attr.USERNAME, username)
    m.add(Attr.PRIORITY, priority)
    m.add(Attr.ICE_CONTROLLING if controlling else Attr.ICE_CONTROLLED, tiebreaker)
    if use_candidate:
        m.add(Attr.USE_CANDIDATE, True)
    return m.encode(key=key)


def binding_success(txid: bytes, mapped: Addr, key: bytes) -> bytes:
    """RFC 8445 §7.3.1: XOR-MAPPED-ADDRESS of the request's source, signed with our password."""
    return Message(Method.BINDING, Class.SUCCESS, txid, [(Attr.XOR_MAPPED_ADDRESS, mapped)]).encode(
        key=key
    )


def binding_error(txid: bytes, code: int, key: bytes) -> bytes:
    """An error response (487 Role Conflict is the one ICE sends)."""
    reason = REASONS.get(code, "Role Conflict" if code == 487 else "")
    return Message(
        Method.BINDING, Class.ERROR, txid, [(Attr.ERROR_CODE, ErrorCode(code, reason))]
    ).encode(key=key)
