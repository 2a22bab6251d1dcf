"""Errors raised by the STUN codec.

::

    ParseError (ValueError)            the bytes are not a well-formed STUN/ChannelData message
    ├── NotStunError                   first two bits or magic cookie wrong, too short for a header
    ├── MessageLengthError             header length disagrees with the datagram, or not 4-aligned
    ├── AttributeParseError            an attribute is truncated or its value is malformed
    ├── FingerprintError               FINGERPRINT misplaced or its CRC does not match
    └── ChannelDataError               ChannelData header, channel number or length is wrong

Messages are exact and stable so that tests (and logs) can rely on them.
"""

from __future__ import annotations


class ParseError(ValueError):
    """The bytes are not a well-formed message."""


class NotStunError(ParseError):
    """The datagram is not STUN at all."""


class MessageLengthError(ParseError):
    """The STUN header's length field does not fit the datagram."""


class AttributeParseError(ParseError):
    """An attribute is truncated or carries a malformed value."""

    def __init__(self, message: str, attr_type: int | None = None) -> None:
        super().__init__(message)
        self.attr_type = attr_type


class FingerprintError(ParseError):
    """FINGERPRINT is not the last attribute, or its CRC-32 does not match."""


class ChannelDataError(ParseError):
    """A TURN ChannelData message is malformed."""
