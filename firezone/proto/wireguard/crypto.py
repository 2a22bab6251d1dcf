"""WireGuard's cryptographic primitives (whitepaper §5.4), built on ``cryptography`` and ``hashlib``.

HASH is BLAKE2s-256, MAC is keyed BLAKE2s-128, HMAC is HMAC-BLAKE2s, KDF_n is HKDF over that HMAC,
AEAD is ChaCha20-Poly1305 with a 64-bit little-endian counter nonce and XAEAD is XChaCha20-Poly1305
(HChaCha20 is written here because ``cryptography`` has no XChaCha).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "CONSTRUCTION",
    "IDENTIFIER",
    "LABEL_COOKIE",
    "LABEL_MAC1",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "hash_",
    "hchacha20",
    "hmac_",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "xaead_decrypt",
    "xaead_encrypt",
]

# Whitepaper §5.4: protocol name, identifier and the two labels.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

_ZERO_NONCE_PREFIX = b"\x00\x00\x00\x00"
_COUNTER = struct.Struct("<Q")


def hash_(data: bytes) -> bytes:
    """HASH(input) = BLAKE2s(input, 32)."""
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """MAC(key, input) = Keyed-BLAKE2s(key, input, 16)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC(key, input) = HMAC-BLAKE2s(key, input, 32)."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: τ0 = HMAC(key, input); τ1 = HMAC(τ0, 0x1)."""
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: τ1 = HMAC(τ0, 0x1); τ2 = HMAC(τ0, τ1 ‖ 0x2)."""
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: τ3 = HMAC(τ0, τ2 ‖ 0x3) in addition to KDF2's outputs."""
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    t3 = hmac_(t0, t2 + b"\x03")
    return t1, t2, t3


def dh(private: bytes, public: bytes) -> bytes:
    """DH(private, public) = X25519; raises ValueError for a low-order public point."""
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def counter_nonce(counter: int) -> bytes:
    """The 96-bit AEAD nonce: 32 zero bits then the 64-bit little-endian counter."""
    return _ZERO_NONCE_PREFIX + _COUNTER.pack(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """AEAD(key, counter, plain text, auth text) = ChaCha20Poly1305."""
    return ChaCha20Poly1305(key).encrypt(counter_nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Open an AEAD box; raises InvalidTag on a bad tag."""
    return ChaCha20Poly1305(key).decrypt(counter_nonce(counter), ciphertext, aad)


# draft-irtf-cfrg-xchacha §2.2: "expand 32-byte k" constants.
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
_M32 = 0xFFFFFFFF


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20(key, 128-bit nonce) -> 256-bit subkey (draft-irtf-cfrg-xchacha §2.2)."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("hchacha20 needs a 32-byte key and a 16-byte nonce")
    s = list(_SIGMA) + list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16))

    def qr(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & _M32
        x = s[d] ^ s[a]
        s[d] = ((x << 16) | (x >> 16)) & _M32
        s[c] = (s[c] + s[d]) & _M32
        x = s[b] ^ s[c]
        s[b] = ((x << 12) | (x >> 20)) & _M32
        s[a] = (s[a] + s[b]) & _M32
        x = s[d] ^ s[a]
        s[d] = ((x << 8) | (x >> 24)) & _M32
        s[c] = (s[c] + s[d]) & _M32
        x = s[b] ^ s[c]
        s[b] = ((x << 7) | (x >> 25)) & _M32

    for _ in range(10):
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    # Unlike the ChaCha20 block function, HChaCha20 adds no input words back.
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def _xchacha_parts(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce) != 24:
        raise ValueError("XChaCha20-Poly1305 needs a 24-byte nonce")
    subkey = hchacha20(key, nonce[:16])
    return ChaCha20Poly1305(subkey), _ZERO_NONCE_PREFIX + nonce[16:]


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XAEAD(key, nonce, plain text, auth text) = XChaCha20Poly1305."""
    aead, n = _xchacha_parts(key, nonce)
    return aead.encrypt(n, plaintext, aad)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Open an XAEAD box; raises InvalidTag on a bad tag."""
    aead, n = _xchacha_parts(key, nonce)
    return aead.decrypt(n, ciphertext, aad)
