"""Known answers recorded against wireguard-go v0.0.20220316 (Debian), both handshake roles.

The datagrams below were exchanged between a fz Tunnel and a real wireguard-go over loopback
(keys fixed, our ephemeral keys pinned, virtual time 100.0, unix time 1_700_000_000). Replaying
them proves our Noise IKpsk2 transcript, mac1, KDF chain, PSK mixing and transport AEAD produce
exactly what wireguard-go produces: wireguard-go's response only opens with the keys derived from
our initiation, and its data packets only decrypt with the session keys we derive.
"""

from __future__ import annotations

import pytest

from firezone.proto.rng import SeededRng
from firezone.proto.wireguard import HandshakeCompleted, Tunnel, public_key
from firezone.proto.wireguard.cookie import verify_mac1
from firezone.proto.wireguard.crypto import LABEL_MAC1, hash_

OUR_PRIVATE = bytes.fromhex("e00c62db42b83d5493581a4360f66fa5bbc1d414bc3d7dc5120c790e6c712d45")
WG_PUBLIC = bytes.fromhex("9d1c8b89332a99dd47de8997e90a4eddb7d56e6685d40bf20b288c8792e8840c")
PSK = bytes(range(32))
INDEX = 0x123456

# --- fz initiates, no PSK; wireguard-go answers an ICMP echo request -------------------------
I_EPHEMERAL = bytes.fromhex("e8cfef9ac3bd8476a78c92846b7d99ac6a3391ffaf141e918b4504a2afc7c37e")
I_PACKET = bytes.fromhex(
    "4500002c00070000400166040a6200020a6200010800b69d42420001667a2d6b6e6f776e2d616e7377657221"
)
I_INITIATION = bytes.fromhex(
    "0100000001563412ee3b7a83266290c126abcb9d0b36fe069c9a7b071c9566985c106876ac416a3878df978673"
    "bd5520289c69660901d6add51da874cf457bb3d93a38f6c8811f87a9c8b0593eb038c34b6e9928051f970c4fb8"
    "35814925f429a97bfa8c981f4b1359605cd2f651e167a72524e9dfc3222b193ca45934012db6468ca890000000"
    "00000000000000000000000000"
)
WG_RESPONSE = bytes.fromhex(
    "02000000209cc53901563412693173b9a100541e6d083560481b19b4d18e9330b824fc387f9b3897fe00e9205"
    "c49458c146218abaed07070be4d75ee433ee324817f4b0ee93cd3d58e7b17200000000000000000000000000"
    "0000000"
)
I_DATA = bytes.fromhex(
    "04000000209cc5390000000000000000a7fd21c328ba22a8588915ee8b804ebbf77a64cfa5d6c5f0aa4592f51"
    "351ac8612332e098962d34d6a0cbc0f937090b99c643f63ccfdfc96f2d49ae0fa1bf433"
)
WG_REPLY = bytes.fromhex(
    "040000000156341200000000000000001342bf4950ddb965be73a82e6edde715032216c91b4041c96354086bc"
    "70a4e90d32c94fc73ad509dd55a77814465223943bb141d8454d561425caa80f692889d"
)
REPLY_PACKET = bytes.fromhex(
    "4500002c8c9100004001d9790a6200010a6200020000be9d42420001667a2d6b6e6f776e2d616e7377657221"
)

# --- wireguard-go initiates with a PSK (triggered by `ping -p 666f7a2d6b6174`) ----------------
R_EPHEMERAL = bytes.fromhex("f0a4dd0dad47b0b9dbf99437554c03e9ec5e562b6964c5c847bca9a9fe9b395d")
WG_INITIATION = bytes.fromhex(
    "010000002f2ca681e464d5fe81c02cd693b9bea092925008fb16b2d6c46384cb74830f7ca276a10ede0b28d17"
    "ea97964a125ef9f8fd20fa50add1ca2b144c94a8a86ec0c5be19bf02acd1d96b60d86e3c7a266d1b7d7f5215"
    "0838916e421dc8f04446c701d66901db2bf9fbe0671fb8e61dbb4317e2244bd2468ac5178779111dce581af0"
    "0000000000000000000000000000000"
)
R_RESPONSE = bytes.fromhex(
    "02000000015634122f2ca6817331d54db16de0200a2b55fe4179425a977717e1369e6d4e5b9973e806729e129"
    "fe5cff877a2c1d80807a784072e8c22128244bfa63580baeb35374ae868196200000000000000000000000000"
    "000000"
)
WG_DATA = bytes.fromhex(
    "04000000015634120000000000000000f07e36469b4e6ce9c1701dc08b9ccf26c26a6119649719e67bc8c97b1"
    "768471ffe338775451ea30f42575cc25409052563c9e05021afb360f12ee231ee4b9b844350f327be77344f09"
    "de9b6fe05332b790cc2c718edb7b8bed1121ceae1ad6d6f1ed507e36c37977cfe1705f37b7b403"
)
REQUEST_PACKET = bytes.fromhex(
    "450000541efd4000400106e60a6200010a62000208000a176be0000172b0066b00000000251f0e0000000000"
    "7a2d6b6174666f7a2d6b6174666f7a2d6b6174666f7a2d6b6174666f7a2d6b6174666f7a2d6b6174"
)


def tunnel(psk: bytes | None, ephemeral: bytes) -> Tunnel:
    t = Tunnel(
        static_private=OUR_PRIVATE,
        peer_public=WG_PUBLIC,
        preshared_key=psk,
        index=INDEX,
        rng=SeededRng("kat"),
        now=100.0,
        unix_time=1_700_000_000.0,
    )
    t._ephemeral = lambda: ephemeral  # type: ignore[method-assign]
    return t


def test_vectors_are_well_formed() -> None:
    assert len(I_INITIATION) == len(WG_INITIATION) == 148
    assert len(WG_RESPONSE) == len(R_RESPONSE) == 92
    # wireguard-go computed mac1 over its messages with our public key.
    our_mac1_key = hash_(LABEL_MAC1 + public_key(OUR_PRIVATE))
    assert verify_mac1(our_mac1_key, WG_RESPONSE)
    assert verify_mac1(our_mac1_key, WG_INITIATION)


def test_we_initiate_and_wireguard_go_answers() -> None:
    t = tunnel(None, I_EPHEMERAL)
    assert t.encapsulate(I_PACKET, 100.0) is None
    assert t.poll_transmit() == I_INITIATION
    assert t.decapsulate(WG_RESPONSE, 100.5) is None
    assert not t.drops
    assert t.poll_event() == HandshakeCompleted(100.5, True)
    assert t.poll_transmit() == I_DATA  # same transport keys as when wireguard-go accepted it
    assert t.decapsulate(WG_REPLY, 101.0) == REPLY_PACKET
    assert REPLY_PACKET[20] == 0  # ICMP echo reply
    assert REPLY_PACKET.endswith(b"fz-known-answer!")


def test_wireguard_go_initiates_with_psk_and_we_answer() -> None:
    t = tunnel(PSK, R_EPHEMERAL)
    assert t.decapsulate(WG_INITIATION, 100.0) is None
    assert not t.drops
    assert t.poll_transmit() == R_RESPONSE
    assert t.decapsulate(WG_DATA, 100.5) == REQUEST_PACKET
    assert t.poll_event() == HandshakeCompleted(100.5, False)
    assert REQUEST_PACKET[20] == 8  # ICMP echo request
    assert b"z-katfoz-kat" in REQUEST_PACKET  # ping's -p 666f7a2d6b6174 ("foz-kat") padding


@pytest.mark.parametrize("psk", [None, b"\x01" * 32])
def test_wrong_psk_cannot_read_wireguard_go(psk: bytes | None) -> None:
    t = tunnel(psk, R_EPHEMERAL)
    t.decapsulate(WG_INITIATION, 100.0)
    response = t.poll_transmit()
    assert response is not None and response != R_RESPONSE
    assert t.decapsulate(WG_DATA, 100.5) is None
    assert t.drops["index"] + t.drops["decrypt"] == 1


def test_replayed_wireguard_go_initiation_is_refused() -> None:
    t = tunnel(PSK, R_EPHEMERAL)
    t.decapsulate(WG_INITIATION, 100.0)
    t.poll_transmit()
    t.decapsulate(WG_INITIATION, 105.0)
    assert t.drops["timestamp"] == 1
    assert t.poll_transmit() is None
