"""WireGuard timer constants (whitepaper §6.1) and the few Firezone overrides.

The timers themselves are deadlines (floats) held by :class:`~.tunnel.Tunnel`; nothing here runs
per packet.
"""

from __future__ import annotations

from firezone.proto.rng import Rng

# Whitepaper §6.1 "Preliminaries".
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
# Whitepaper §5.4.7: a cookie is usable for two minutes.
COOKIE_REFRESH_TIME = 120.0

# Whitepaper §6.1: the initiator rekeys on receive once its keys are this old, so that a new
# session exists before REJECT_AFTER_TIME even if it only receives.
REKEY_ON_RECEIVE_AFTER = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# Whitepaper §6.4: handshake retransmits get up to 1/3 s of jitter.
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
# wireguard-go: a peer may not start handshakes more often than 50 per second.
HANDSHAKE_INITIATION_RATE = 1.0 / 50.0
# Firezone (snownet): connections set up over ICE give up rekeying after 20 s.
ICE_REKEY_ATTEMPT_TIME = 20.0
# wireguard-go QueueStagedSize: packets held while a handshake is in flight.
MAX_QUEUED_PACKETS = 128


def jitter(rng: Rng) -> float:
    """A random delay in [0, REKEY_TIMEOUT_JITTER_MAX) seconds."""
    return rng.random() * REKEY_TIMEOUT_JITTER_MAX
