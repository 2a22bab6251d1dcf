"""Secrets of the invoking OS user: the OS keyring when one exists, else a 0600 file.

Never keyrings.alt: a plaintext "keyring" that pretends to be secure is worse than an explicit file
whose location we print. Entries are small JSON objects (portal URL, token, who signed in).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firezone.config import user_config_path

log = logging.getLogger(__name__)

SERVICE = "firezone"


@dataclass(frozen=True)
class Stored:
    """Where a secret ended up: ``"keyring"`` or the path of the 0600 file."""

    backend: str
    location: str


def _files_dir() -> Path:
    return user_config_path().parent / "credentials"


def _file_for(name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return _files_dir() / f"{safe}.json"


def _usable_keyring() -> Any | None:
    if os.environ.get("FIREZONE_CREDENTIALS") == "file":
        return None
    try:
        import keyring
        from keyring.backends import fail

        kr = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - any keyring import/config problem means "no keyring"
        return None
    mod = type(kr).__module__
    if isinstance(kr, fail.Keyring) or mod.startswith(("keyrings.alt", "keyring.backends.null")):
        return None
    chained = getattr(kr, "backends", None)
    if chained is not None and not chained:
        return None
    return kr


def store(name: str, value: dict[str, Any]) -> Stored:
    """Save ``value`` under ``name``; returns where it went."""
    payload = json.dumps(value, sort_keys=True)
    kr = _usable_keyring()
    if kr is not None:
        try:
            kr.set_password(SERVICE, name, payload)
            _remove_file(name)
            return Stored("keyring", f"{type(kr).__name__} ({SERVICE}/{name})")
        except Exception as e:  # noqa: BLE001 - locked or broken keyring: fall back to the file
            log.debug("keyring unavailable, using a file", extra={"error": str(e)})
    path = _file_for(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(payload)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return Stored("file", str(path))


def load(name: str) -> dict[str, Any] | None:
    kr = _usable_keyring()
    if kr is not None:
        try:
            raw = kr.get_password(SERVICE, name)
        except Exception:  # noqa: BLE001
            raw = None
        if raw:
            return _decode(raw)
    path = _file_for(name)
    try:
        return _decode(path.read_text())
    except FileNotFoundError:
        return None


def delete(name: str) -> bool:
    found = False
    kr = _usable_keyring()
    if kr is not None:
        try:
            if kr.get_password(SERVICE, name) is not None:
                kr.delete_password(SERVICE, name)
                found = True
        except Exception:  # noqa: BLE001
            pass
    return _remove_file(name) or found


def _remove_file(name: str) -> bool:
    try:
        _file_for(name).unlink()
        return True
    except FileNotFoundError:
        return False


def _decode(raw: str) -> dict[str, Any] | None:
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


# The admin sign-in that `fz portal init` leaves for the admin commands.
ADMIN = "admin"
