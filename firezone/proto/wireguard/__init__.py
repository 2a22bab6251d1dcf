"""Sans-IO WireGuard: Noise IKpsk2 handshakes, transport sessions, timers, cookies, a device.

Nothing here touches sockets, TUN devices or clocks; callers pass ``now`` and move bytes. A driver
for a :class:`Device` looks like::

    dev = Device(private_key, rng=SYSTEM_RNG, now=loop.time(), unix_time=time.time())
    dev.add_peer(peer_pub, allowed_ips=["10.0.0.2/32"], endpoint=("192.0.2.1", 51820), now=...)
    # TUN readable:    out = dev.handle_tun_packet(pkt, now);  out -> sock.sendto(*out)
    # socket readable: pkt = dev.handle_datagram(data, addr, now);  pkt -> tun.write(pkt)
    # after every input and on the timer: drain dev.poll_transmit() -> sock.sendto(dg, addr),
    # dev.poll_event(); then re-arm one timer at dev.poll_timeout() and call dev.handle_timeout(now)
"""

from .cookie import RateLimiter
from .device import Device, Peer
from .keys import b64decode_key, b64encode_key, generate_private_key, public_key
from .messages import (
    CookieReply,
    HandshakeInitiation,
    HandshakeResponse,
    ParseError,
    TransportData,
    parse_message,
)
from .tunnel import (
    ConnectionExpired,
    HandshakeCompleted,
    Tunnel,
    TunnelEvent,
    parse_initiation_sender,
)

__all__ = [
    "ConnectionExpired",
    "CookieReply",
    "Device",
    "HandshakeCompleted",
    "HandshakeInitiation",
    "HandshakeResponse",
    "ParseError",
    "Peer",
    "RateLimiter",
    "TransportData",
    "Tunnel",
    "TunnelEvent",
    "b64decode_key",
    "b64encode_key",
    "generate_private_key",
    "parse_initiation_sender",
    "parse_message",
    "public_key",
]
