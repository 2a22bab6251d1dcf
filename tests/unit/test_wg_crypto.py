"""Known answers for the primitives WireGuard is built from, and key helpers."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firezone.proto.rng import SeededRng
from firezone.proto.wireguard import b64decode_key, b64encode_key, generate_private_key, public_key
from firezone.proto.wireguard.crypto import (
    CONSTRUCTION,
    IDENTIFIER,
    InvalidTag,
    hchacha20,
    kdf1,
    kdf2,
    kdf3,
    mac,
    xaead_decrypt,
    xaead_encrypt,
)
from firezone.proto.wireguard.handshake import INITIAL_CHAIN, INITIAL_HASH
from firezone.proto.wireguard.keys import clamp

# draft-irtf-cfrg-xchacha-03 §2.2.1
HCHACHA_KEY = bytes(range(32))
HCHACHA_NONCE = bytes.fromhex("000000090000004a0000000031415927")
HCHACHA_OUT = bytes.fromhex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")

# draft-irtf-cfrg-xchacha-03 §A.3.1
X_KEY = bytes(range(0x80, 0xA0))
X_NONCE = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555657")
X_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
X_PLAIN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
X_CIPHER = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
X_TAG = bytes.fromhex("c0875924c1c7987947deafd8780acf49")


def test_hchacha20_draft_vector() -> None:
    assert hchacha20(HCHACHA_KEY, HCHACHA_NONCE) == HCHACHA_OUT


def test_hchacha20_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="32-byte key and a 16-byte nonce"):
        hchacha20(bytes(31), HCHACHA_NONCE)


def test_xchacha20poly1305_draft_vector() -> None:
    assert xaead_encrypt(X_KEY, X_NONCE, X_PLAIN, X_AAD) == X_CIPHER + X_TAG
    assert xaead_decrypt(X_KEY, X_NONCE, X_CIPHER + X_TAG, X_AAD) == X_PLAIN


def test_xchacha20poly1305_rejects_tampering() -> None:
    bad = bytearray(X_CIPHER + X_TAG)
    bad[0] ^= 1
    with pytest.raises(InvalidTag):
        xaead_decrypt(X_KEY, X_NONCE, bytes(bad), X_AAD)
    with pytest.raises(InvalidTag):
        xaead_decrypt(X_KEY, X_NONCE, X_CIPHER + X_TAG, X_AAD + b"x")


def test_noise_initial_chaining_key_and_hash() -> None:
    # Ci = HASH(CONSTRUCTION), Hi = HASH(Ci ‖ IDENTIFIER) with BLAKE2s-256.
    assert CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert INITIAL_CHAIN == hashlib.blake2s(CONSTRUCTION).digest()
    assert INITIAL_HASH == hashlib.blake2s(INITIAL_CHAIN + IDENTIFIER).digest()
    # The value every WireGuard implementation starts from.
    assert INITIAL_CHAIN.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"


def test_kdf_is_hkdf_over_hmac_blake2s() -> None:
    key, data = b"k" * 32, b"input"
    t0 = hmac.new(key, data, hashlib.blake2s).digest()
    t1 = hmac.new(t0, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(t0, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = hmac.new(t0, t2 + b"\x03", hashlib.blake2s).digest()
    assert kdf1(key, data) == t1
    assert kdf2(key, data) == (t1, t2)
    assert kdf3(key, data) == (t1, t2, t3)


def test_mac_is_keyed_blake2s_128() -> None:
    assert mac(b"k" * 32, b"m") == hashlib.blake2s(b"m", key=b"k" * 32, digest_size=16).digest()
    assert len(mac(b"k" * 32, b"m")) == 16


# RFC 7748 §6.1
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_key_rfc7748_vector() -> None:
    assert public_key(ALICE_PRIV) == ALICE_PUB


def test_generated_keys_are_clamped_and_deterministic_per_seed() -> None:
    k1 = generate_private_key(SeededRng(3))
    k2 = generate_private_key(SeededRng(3))
    assert k1 == k2 and len(k1) == 32
    assert k1[0] & 7 == 0 and k1[31] & 0x80 == 0 and k1[31] & 0x40
    assert clamp(k1) == k1


@given(st.binary(min_size=32, max_size=32))
def test_clamp_is_idempotent(raw: bytes) -> None:
    assert clamp(clamp(raw)) == clamp(raw)


@given(st.binary(min_size=32, max_size=32))
def test_b64_round_trip(raw: bytes) -> None:
    text = b64encode_key(raw)
    assert len(text) == 44 and text.endswith("=")
    assert b64decode_key(text) == raw
    assert b64decode_key(f"  {text}\n") == raw


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "a WireGuard key is 44 base64 characters ending in '='"),
        ("abc", "a WireGuard key is 44 base64 characters ending in '='"),
        ("A" * 43 + "=" + "A", "a WireGuard key is 44 base64 characters ending in '='"),
        ("!" * 43 + "=", "a WireGuard key must be valid base64"),
        ("A" * 42 + "==", "a WireGuard key is 32 bytes, got 31"),
    ],
)
def test_b64_decode_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        b64decode_key(text)
    assert str(exc.value) == message


def test_b64_encode_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes, got 3"):
        b64encode_key(b"abc")
