"""Micro-benchmark of the sans-IO WireGuard data path: encapsulate + decapsulate per second.

Runs, in one process and one run, (1) our Tunnel pair moving 1400-byte packets a -> b and
(2) the bare AEAD work the same packets need (one ChaCha20Poly1305 seal + open from
``cryptography``) as the ceiling any Python implementation on this machine can reach. Prints the
median of several rounds and the ratio. Usage: ``python bench/wg_engine/run.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import struct
import time

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from firezone.proto.wireguard.testing import TunnelPair, ipv4_packet

SIZE = 1400


def ours(n: int) -> float:
    pair = TunnelPair(seed=1)
    pkt = ipv4_packet("10.0.0.1", "10.0.0.2", bytes(SIZE - 20))
    assert pair.send("a", pkt) == pkt
    a, b, now = pair.a, pair.b, pair.now
    enc, dec = a.encapsulate, b.decapsulate
    t0 = time.perf_counter()
    for _ in range(n):
        dec(enc(pkt, now), now)  # type: ignore[arg-type]
    dt = time.perf_counter() - t0
    assert not b.drops, b.drops
    return n / dt


def bare_aead(n: int) -> float:
    aead = ChaCha20Poly1305(bytes(32))
    nonce = struct.Struct("<4xQ")
    pkt = bytes(SIZE + 8)  # the padded plaintext size
    t0 = time.perf_counter()
    for i in range(n):
        aead.decrypt(nonce.pack(i), aead.encrypt(nonce.pack(i), pkt, None), None)
    return n / (time.perf_counter() - t0)


def handshakes(n: int) -> float:
    pair = TunnelPair(seed=2)
    t0 = time.perf_counter()
    for i in range(n):
        pair.now += 1.0  # past the responder's 20 ms flood limit
        pair.a.force_handshake(pair.now)
        pair.pump()
    dt = time.perf_counter() - t0
    assert len(pair.events["a"]) == n
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--packets", type=int, default=50_000)
    args = ap.parse_args()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(
        f"cpu: {cpu}; python {platform.python_version()}; cryptography {cryptography.__version__}"
    )
    r_ours, r_bare = [], []
    for _ in range(args.rounds):
        r_ours.append(ours(args.packets))
        r_bare.append(bare_aead(args.packets))
    mo, mb = statistics.median(r_ours), statistics.median(r_bare)
    hs = statistics.median(handshakes(300) for _ in range(3))
    gbit = mo * SIZE * 8 / 1e9
    print(
        f"fz Tunnel encapsulate+decapsulate, {SIZE} B: {mo:,.0f} packets/s ({gbit:.2f} Gbit/s of payload)"
    )
    print(f"bare ChaCha20Poly1305 seal+open, {SIZE} B:   {mb:,.0f} packets/s")
    print(f"ratio fz / bare AEAD: {mo / mb:.2f}")
    print(f"full handshakes (initiation + response + keepalive), both sides: {hs:,.0f}/s")


if __name__ == "__main__":
    main()
