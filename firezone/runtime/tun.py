"""TUN devices: open ``/dev/net/tun`` and attach to an interface with our own TUNSETIFF ioctl."""

from __future__ import annotations

import fcntl
import logging
import os
import struct

log = logging.getLogger(__name__)

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

DEFAULT_MTU = 1280


class TunError(OSError):
    """The TUN device could not be created or attached."""


def open_tun(name: str, *, multi_queue: bool = False, vnet_hdr: bool = False) -> tuple[int, str]:
    """Create (or attach to) TUN interface ``name``; return (non-blocking fd, actual name).

    ``name`` may contain ``%d`` to let the kernel pick a number. With ``multi_queue`` every call
    with the same name adds one more queue (one fd per queue, spread by flow hash). With
    ``vnet_hdr`` every read and write starts with a virtio-net header (see tun_offload).
    """
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"interface name {name!r} must be 1..{IFNAMSIZ - 1} bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(e.errno, f"cannot open /dev/net/tun: {e.strerror}") from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0) | (IFF_VNET_HDR if vnet_hdr else 0)
    ifr = struct.pack("16sH22x", name.encode(), flags)
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        raise TunError(e.errno, f"TUNSETIFF {name}: {e.strerror}") from None
    actual = res[:IFNAMSIZ].rstrip(b"\0").decode()
    log.debug("opened TUN device", extra={"iface": actual, "multi_queue": multi_queue,
                                          "vnet_hdr": vnet_hdr})
    return fd, actual
