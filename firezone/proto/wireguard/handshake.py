"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (whitepaper §5.4.2–§5.4.4).

Theory of operation
-------------------
Two messages. The initiator knows the responder's static key up front (IK pattern):

    initiator                                  responder
    create_initiation()  --- type 1 (148 B) -->  decrypt_initiation_static()  (finds the peer)
                                                 finish_initiation()          (timestamp check)
                                                 create_response()            -> Session keys
    consume_response()   <-- type 2 (92 B) ---
    -> Session keys

The chaining key C and hash H evolve identically on both sides; every step below carries the
whitepaper's formula as its comment. Functions here are pure: ephemeral private keys and the
TAI64N timestamp are passed in, MACs (mac1/mac2) are added by :mod:`.cookie`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .crypto import (
    CONSTRUCTION,
    IDENTIFIER,
    LABEL_COOKIE,
    LABEL_MAC1,
    InvalidTag,
    aead_decrypt,
    aead_encrypt,
    hash_,
    kdf1,
    kdf2,
    kdf3,
)
from .messages import (
    _INITIATION,
    _RESPONSE,
    INITIATION_LEN,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_LEN,
)

__all__ = [
    "ConsumedInitiation",
    "InitiatorState",
    "LocalIdentity",
    "PeerKeys",
    "consume_response",
    "create_initiation",
    "create_response",
    "decrypt_initiation_static",
    "finish_initiation",
    "tai64n",
]

# Ci = HASH(CONSTRUCTION); Hi = HASH(Ci ‖ IDENTIFIER) — the same for every handshake.
INITIAL_CHAIN = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN + IDENTIFIER)

# TAI64N: big-endian 8-byte TAI64 label (2^62 + 10 s of TAI-UTC offset + UNIX seconds) and
# 4-byte nanoseconds. Nanoseconds are rounded down to 2^24 ns like wireguard-go does, so the
# timestamp does not leak a precise clock.
_TAI64_BASE = 0x400000000000000A
_TAI64N = struct.Struct(">QI")
_WHITEN = ~(0x1000000 - 1)


def tai64n(unix_time: float) -> bytes:
    """TAI64N(unix_time) as 12 bytes."""
    secs = int(unix_time // 1)
    nanos = int((unix_time - secs) * 1e9) & _WHITEN
    return _TAI64N.pack(_TAI64_BASE + secs, min(max(nanos, 0), 999_999_999))


def _pub(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    # cryptography raises ValueError for an all-zero shared secret (low-order point).
    return private.exchange(X25519PublicKey.from_public_bytes(public))


class LocalIdentity:
    """Our static key pair and everything derived from it alone (shared by all peers)."""

    __slots__ = ("_key", "cookie_key", "mac1_key", "private", "public", "responder_hash")

    def __init__(self, static_private: bytes) -> None:
        if len(static_private) != 32:
            raise ValueError("static private key must be 32 bytes")
        self._key = X25519PrivateKey.from_private_bytes(static_private)
        self.private = static_private
        self.public = _pub(self._key)
        # Hr = HASH(HASH(Ci ‖ IDENTIFIER) ‖ Spub_r) when we are the responder.
        self.responder_hash = hash_(INITIAL_HASH + self.public)
        # mac1 on messages sent TO us: MAC(HASH(LABEL_MAC1 ‖ Spub_m), msg[0:off(mac1)])
        self.mac1_key = hash_(LABEL_MAC1 + self.public)
        # Cookie replies we send: XAEAD(HASH(LABEL_COOKIE ‖ Spub_m), nonce, τ, mac1)
        self.cookie_key = hash_(LABEL_COOKIE + self.public)

    def dh(self, public: bytes) -> bytes:
        return _dh(self._key, public)

    def __repr__(self) -> str:
        return "LocalIdentity(<redacted>)"


class PeerKeys:
    """Values fixed for one (local, remote) pair: static-static DH, PSK, peer-side labels."""

    __slots__ = ("cookie_key", "initiator_hash", "mac1_key", "psk", "remote_public", "ss")

    def __init__(self, local: LocalIdentity, remote_public: bytes, psk: bytes | None) -> None:
        if len(remote_public) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if psk is not None and len(psk) != 32:
            raise ValueError("preshared key must be 32 bytes")
        self.remote_public = remote_public
        # Q: 32 zero bytes when no PSK is configured.
        self.psk = psk if psk is not None else bytes(32)
        # DH(Spriv_i, Spub_r) = DH(Spriv_r, Spub_i); computed once per peer.
        self.ss = local.dh(remote_public)
        # Hi = HASH(HASH(Ci ‖ IDENTIFIER) ‖ Spub_r) when we are the initiator.
        self.initiator_hash = hash_(INITIAL_HASH + remote_public)
        self.mac1_key = hash_(LABEL_MAC1 + remote_public)
        self.cookie_key = hash_(LABEL_COOKIE + remote_public)

    def __repr__(self) -> str:
        return "PeerKeys(<redacted>)"


@dataclass(slots=True, repr=False)
class InitiatorState:
    """What the initiator keeps between sending type 1 and receiving type 2."""

    sender_index: int
    ephemeral: X25519PrivateKey
    chain: bytes
    hash: bytes


@dataclass(slots=True, repr=False)
class ConsumedInitiation:
    """A decrypted initiation, before the responder answers it."""

    sender_index: int
    initiator_static: bytes
    initiator_ephemeral: bytes
    chain: bytes
    hash: bytes
    timestamp: bytes = b""


def create_initiation(
    local: LocalIdentity,
    peer: PeerKeys,
    sender_index: int,
    ephemeral_private: bytes,
    timestamp: bytes,
) -> tuple[InitiatorState, bytes]:
    """Build a type-1 message without MACs (mac1/mac2 zero) and the initiator's state."""
    # Ci = HASH(CONSTRUCTION); Hi = HASH(HASH(Ci ‖ IDENTIFIER) ‖ Spub_r)
    c = INITIAL_CHAIN
    h = peer.initiator_hash
    # (Epriv_i, Epub_i) = DH-Generate()
    eph = X25519PrivateKey.from_private_bytes(ephemeral_private)
    e_pub = _pub(eph)
    # Ci = KDF1(Ci, Epub_i); msg.ephemeral = Epub_i
    c = kdf1(c, e_pub)
    # Hi = HASH(Hi ‖ msg.ephemeral)
    h = hash_(h + e_pub)
    # (Ci, κ) = KDF2(Ci, DH(Epriv_i, Spub_r))
    c, k = kdf2(c, _dh(eph, peer.remote_public))
    # msg.static = AEAD(κ, 0, Spub_i, Hi)
    enc_static = aead_encrypt(k, 0, local.public, h)
    # Hi = HASH(Hi ‖ msg.static)
    h = hash_(h + enc_static)
    # (Ci, κ) = KDF2(Ci, DH(Spriv_i, Spub_r))
    c, k = kdf2(c, peer.ss)
    # msg.timestamp = AEAD(κ, 0, TAI64N(), Hi)
    enc_ts = aead_encrypt(k, 0, timestamp, h)
    # Hi = HASH(Hi ‖ msg.timestamp)
    h = hash_(h + enc_ts)
    msg = _INITIATION.pack(
        MSG_INITIATION, sender_index, e_pub, enc_static, enc_ts, bytes(16), bytes(16)
    )
    return InitiatorState(sender_index, eph, c, h), msg


def decrypt_initiation_static(local: LocalIdentity, msg: bytes) -> ConsumedInitiation | None:
    """Responder, first half: recover the initiator's static key (None if it does not open)."""
    if len(msg) != INITIATION_LEN or msg[0] != MSG_INITIATION:
        return None
    _, sender, e_pub, enc_static, _enc_ts, _m1, _m2 = _INITIATION.unpack(msg)
    c = INITIAL_CHAIN
    h = local.responder_hash
    # Ci = KDF1(Ci, msg.ephemeral); Hi = HASH(Hi ‖ msg.ephemeral)
    c = kdf1(c, e_pub)
    h = hash_(h + e_pub)
    try:
        # (Ci, κ) = KDF2(Ci, DH(Spriv_r, msg.ephemeral))
        c, k = kdf2(c, local.dh(e_pub))
        # Spub_i = AEAD-Open(κ, 0, msg.static, Hi)
        static = aead_decrypt(k, 0, enc_static, h)
    except (ValueError, InvalidTag):
        return None
    # Hi = HASH(Hi ‖ msg.static)
    h = hash_(h + enc_static)
    return ConsumedInitiation(sender, static, e_pub, c, h)


def finish_initiation(peer: PeerKeys, msg: bytes, consumed: ConsumedInitiation) -> bool:
    """Responder, second half: open the timestamp with the static-static DH (fills it in)."""
    enc_ts = msg[88:116]
    # (Ci, κ) = KDF2(Ci, DH(Spriv_r, Spub_i))
    c, k = kdf2(consumed.chain, peer.ss)
    try:
        # timestamp = AEAD-Open(κ, 0, msg.timestamp, Hi)
        ts = aead_decrypt(k, 0, enc_ts, consumed.hash)
    except InvalidTag:
        return False
    consumed.chain = c
    # Hi = HASH(Hi ‖ msg.timestamp)
    consumed.hash = hash_(consumed.hash + enc_ts)
    consumed.timestamp = ts
    return True


def create_response(
    peer: PeerKeys,
    consumed: ConsumedInitiation,
    sender_index: int,
    ephemeral_private: bytes,
) -> tuple[bytes, bytes, bytes]:
    """Build a type-2 message without MACs; returns (msg, send_key, receive_key)."""
    c, h = consumed.chain, consumed.hash
    # (Epriv_r, Epub_r) = DH-Generate()
    eph = X25519PrivateKey.from_private_bytes(ephemeral_private)
    e_pub = _pub(eph)
    # Cr = KDF1(Cr, Epub_r); msg.ephemeral = Epub_r
    c = kdf1(c, e_pub)
    # Hr = HASH(Hr ‖ msg.ephemeral)
    h = hash_(h + e_pub)
    # Cr = KDF1(Cr, DH(Epriv_r, Epub_i))
    c = kdf1(c, _dh(eph, consumed.initiator_ephemeral))
    # Cr = KDF1(Cr, DH(Epriv_r, Spub_i))
    c = kdf1(c, _dh(eph, consumed.initiator_static))
    # (Cr, τ, κ) = KDF3(Cr, Q)
    c, tau, k = kdf3(c, peer.psk)
    # Hr = HASH(Hr ‖ τ)
    h = hash_(h + tau)
    # msg.empty = AEAD(κ, 0, ε, Hr)
    empty = aead_encrypt(k, 0, b"", h)
    # Hr = HASH(Hr ‖ msg.empty) — not needed afterwards.
    msg = _RESPONSE.pack(
        MSG_RESPONSE, sender_index, consumed.sender_index, e_pub, empty, bytes(16), bytes(16)
    )
    # (Trecv_r, Tsend_r) = KDF2(Cr, ε)
    t_recv, t_send = kdf2(c, b"")
    return msg, t_send, t_recv


def consume_response(
    local: LocalIdentity, peer: PeerKeys, state: InitiatorState, msg: bytes
) -> tuple[bytes, bytes] | None:
    """Initiator: open a type-2 message; returns (send_key, receive_key) or None."""
    if len(msg) != RESPONSE_LEN or msg[0] != MSG_RESPONSE:
        return None
    _, _sender, _receiver, e_pub, empty, _m1, _m2 = _RESPONSE.unpack(msg)
    c, h = state.chain, state.hash
    try:
        # Cr = KDF1(Cr, msg.ephemeral); Hr = HASH(Hr ‖ msg.ephemeral)
        c = kdf1(c, e_pub)
        h = hash_(h + e_pub)
        # Cr = KDF1(Cr, DH(Epriv_i, msg.ephemeral))
        c = kdf1(c, _dh(state.ephemeral, e_pub))
        # Cr = KDF1(Cr, DH(Spriv_i, msg.ephemeral))
        c = kdf1(c, local.dh(e_pub))
        # (Cr, τ, κ) = KDF3(Cr, Q); Hr = HASH(Hr ‖ τ)
        c, tau, k = kdf3(c, peer.psk)
        h = hash_(h + tau)
        # ε = AEAD-Open(κ, 0, msg.empty, Hr)
        aead_decrypt(k, 0, empty, h)
    except (ValueError, InvalidTag):
        return None
    # (Tsend_i, Trecv_i) = KDF2(Ci, ε)
    t_send, t_recv = kdf2(c, b"")
    return t_send, t_recv
