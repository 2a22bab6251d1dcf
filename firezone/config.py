"""Effective configuration: flag > ``FIREZONE_*`` environment > TOML file > default.

Keys are dotted (``portal.listen``); the environment variable for a key is ``FIREZONE_`` plus the
key upper-cased with dots as underscores (``FIREZONE_PORTAL_LISTEN``). Files: ``/etc/firezone/
config.toml`` for services, then the per-user file under the platformdirs config directory; a
``--config PATH`` replaces both.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import platformdirs

SYSTEM_CONFIG = Path("/etc/firezone/config.toml")
APP_NAME = "firezone"


class ConfigError(ValueError):
    """The configuration file or an environment value is invalid."""


def user_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def user_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def user_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP_NAME))


def _parse_bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {v!r}")


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return "FIREZONE_" + self.name.upper().replace(".", "_").replace("-", "_")

    def convert(self, value: Any) -> Any:
        if value is None:
            return None
        if self.type is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if self.type is int:
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if self.type is list:
            if isinstance(value, list):
                return [str(v) for v in value]
            return [v.strip() for v in str(value).split(",") if v.strip()]
        return str(value)


KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("portal_url", str, None, "portal URL used by admin, client, gateway and relay commands (flag --portal)"),
        Key("log.format", str, "auto", "log output: auto (rich on a terminal, JSON lines otherwise), rich or json"),
        Key("portal.listen", str, "127.0.0.1:8080", "HOST:PORT the portal serves HTTP and WebSocket on"),
        Key("portal.data_dir", str, None, "directory holding the portal's SQLite database"),
        Key("portal.external_url", str, None, "URL people and devices use to reach the portal"),
        Key("portal.smtp_host", str, None, "SMTP server for sign-in codes"),
        Key("portal.smtp_port", int, 587, "SMTP port"),
        Key("portal.smtp_starttls", bool, True, "use STARTTLS with the SMTP server"),
        Key("portal.smtp_user", str, None, "SMTP user name"),
        Key("portal.smtp_password", str, None, "SMTP password", secret=True),
        Key("portal.smtp_from", str, "fz <no-reply@localhost>", "sender address of sign-in mails"),
        Key("portal.smtp_print", bool, False,
            "write sign-in mails to the portal log instead of sending them (local use only)"),
        Key("portal.email_code_ttl", int, 900, "seconds a mailed sign-in code stays valid"),
        Key("portal.email_response_ms", int, 800,
            "every email sign-in request takes at least this long, whether the address exists or not"),
        Key("portal.max_body_bytes", int, 1_048_576, "largest request body the REST API accepts"),
        Key("portal.reevaluate_interval", int, 60,
            "seconds between re-evaluations of time-window policy conditions for connected clients"),
        Key("portal.authorization_timeout", int, 15,
            "seconds a gateway has to acknowledge an authorization before the client hears 'offline'"),
    ]
}


# ``portal`` is also the name of the [portal] table, so the URL lives under ``portal_url``.
ALIASES = {"portal": "portal_url"}


def register_key(key: Key) -> None:
    """Let a role add its own keys (relay.*, gateway.*, client.*)."""
    KEYS[key.name] = key


@dataclass
class Config:
    """Effective configuration with the source of every value."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def get(self, name: str, default: Any = None) -> Any:
        name = ALIASES.get(name, name)
        v = self.values.get(name)
        if v is None:
            key = KEYS.get(name)
            v = key.default if key is not None else None
        if v is None:
            if name == "portal.data_dir":
                return str(user_data_dir() / "portal")
            return default
        return v

    def source(self, name: str) -> str:
        return self.sources.get(ALIASES.get(name, name), "default")

    def set_flag(self, name: str, value: Any) -> None:
        name = ALIASES.get(name, name)
        if value is None:
            return
        key = KEYS.get(name)
        self.values[name] = key.convert(value) if key else value
        self.sources[name] = "flag"

    def effective(self) -> list[tuple[str, Any, str]]:
        rows = []
        for name, key in sorted(KEYS.items()):
            v = self.get(name)
            if key.secret and v is not None:
                v = "********"
            rows.append((name, v, self.source(name)))
        return rows


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return _flatten(data)


def load(path: Path | None = None, env: Mapping[str, str] | None = None,
         warn: Callable[[str], None] | None = None) -> Config:
    """Read files and environment into a :class:`Config` (flags are applied by the caller)."""
    environ: Mapping[str, str] = os.environ if env is None else env
    cfg = Config()
    files = [path] if path is not None else [SYSTEM_CONFIG, user_config_path()]
    if path is not None and not path.exists():
        raise ConfigError(f"{path}: no such config file")
    for f in files:
        try:
            if not f.is_file():
                continue
        except OSError as e:
            raise ConfigError(f"{f}: cannot read: {e.strerror}") from None
        cfg.files.append(f)
        for name, value in _read_file(f).items():
            key = KEYS.get(name)
            if key is None:
                if warn:
                    warn(f"{f}: unknown key {name!r} ignored")
                continue
            try:
                cfg.values[name] = key.convert(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{f}: key {name!r}: {e}") from None
            cfg.sources[name] = str(f)
    for name, key in KEYS.items():
        if key.env in environ:
            try:
                cfg.values[name] = key.convert(environ[key.env])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"environment {key.env}: {e}") from None
            cfg.sources[name] = f"env {key.env}"
    return cfg
