"""TURN (RFC 8656): the relay's server core and the shared credential scheme; pure."""

from firezone.proto.turn.credentials import (
    REALM,
    make_credentials,
    parse_username,
    password_for,
    salt_for,
    secret_text,
)
from firezone.proto.turn.server import (
    Command,
    CreateAllocationPort,
    FreeAllocationPort,
    SendToClient,
    SendToPeer,
    TurnServer,
    TurnStats,
)

__all__ = [
    "REALM",
    "Command",
    "CreateAllocationPort",
    "FreeAllocationPort",
    "SendToClient",
    "SendToPeer",
    "TurnServer",
    "TurnStats",
    "make_credentials",
    "parse_username",
    "password_for",
    "salt_for",
    "secret_text",
]
