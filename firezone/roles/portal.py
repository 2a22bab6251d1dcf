"""The portal process: open the store, migrate, serve HTTP (REST API, health, metrics) on uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop
from aiohttp import web

from firezone.portal.db.migrate import migrate
from firezone.portal.db.sqlite import SqliteDatabase
from firezone.portal.store import Store
from firezone.portal.web.app import create_app
from firezone.portal.web.signin import SigninSettings

if TYPE_CHECKING:
    from firezone.config import Config

log = logging.getLogger(__name__)

DB_NAME = "portal.db"


class PortalExists(Exception):
    pass


def parse_listen(value: str, default_port: int = 8080) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``HOST`` -> (host, port); ValueError with a clear message."""
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, port_s = v.split(":")
    elif ":" in v:
        host, port_s = v, ""  # bare IPv6
    else:
        host, port_s = v, ""
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise ValueError(f"{value!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: the port must be between 0 and 65535")
    return host or "0.0.0.0", port


def open_store(data_dir: Path) -> Store:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = SqliteDatabase(data_dir / DB_NAME)
    migrate(db)
    return Store(db)


@dataclass
class InitResult:
    account: dict
    admin: dict
    token: str
    db_path: Path


def init(data_dir: Path, *, slug: str, account_name: str | None, admin_email: str,
         admin_name: str | None = None) -> InitResult:
    """Create a new portal database with one account, its admin and an admin API token."""
    db_path = data_dir / DB_NAME
    if db_path.exists():
        store = open_store(data_dir)
        if store.accounts():
            raise PortalExists(f"a portal already exists in {data_dir} (database {db_path}); "
                               "use another --data-dir or remove that directory first")
    store = open_store(data_dir)
    account = store.create_account(account_name or slug, slug)
    admin = store.create_actor(account["id"], email=admin_email, name=admin_name, type="admin")
    _row, secret = store.create_token(account["id"], type="api", name="created by fz portal init", actor=admin["id"])
    return InitResult(account, admin, secret, db_path)


def add_account(data_dir: Path, *, slug: str, account_name: str | None, admin_email: str,
                admin_name: str | None = None) -> InitResult:
    """Add another account (with its admin and an admin API token) to an existing portal."""
    db_path = data_dir / DB_NAME
    if not db_path.exists():
        raise FileNotFoundError(f"no portal in {data_dir}")
    store = open_store(data_dir)
    account = store.create_account(account_name or slug, slug)
    admin = store.create_actor(account["id"], email=admin_email, name=admin_name, type="admin")
    _row, secret = store.create_token(account["id"], type="api", name="created by fz portal add-account",
                                      actor=admin["id"])
    return InitResult(account, admin, secret, db_path)


def secret_key(data_dir: Path) -> bytes:
    """The portal's own 32-byte secret (per-pair WireGuard PSKs derive from it), made once."""
    path = data_dir / "secret_key"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


async def serve(data_dir: Path, host: str, port: int, *, max_body_bytes: int = 1_048_576,
                reevaluate_interval: float = 60.0, authorization_timeout: float = 15.0, ready: asyncio.Event | None = None,
                signin: SigninSettings | None = None) -> None:
    from firezone.portal.channels import Hub

    store = open_store(data_dir)
    hub = Hub(store, secret_key=secret_key(data_dir), reevaluate_interval=reevaluate_interval,
              authorization_timeout=authorization_timeout)
    if signin is not None and not signin.mail.configured:
        log.warning("sign-in codes cannot be mailed: set portal.smtp_host (or run with --smtp-print)")
    app = create_app(store, max_body_bytes=max_body_bytes, hub=hub, signin=signin)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("portal listening", extra={"url": f"http://{host}:{port}", "data_dir": str(data_dir), "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("portal stopping")
        await runner.cleanup()
        store.db.close()


def signin_settings(config: Config, *, smtp_print: bool = False) -> SigninSettings:
    """Mail and sign-in settings of ``fz portal serve`` from the effective configuration."""
    from firezone.portal.web.mailer import MailSettings

    mail = MailSettings(host=config.get("portal.smtp_host"), port=int(config.get("portal.smtp_port")),
                        starttls=bool(config.get("portal.smtp_starttls")), user=config.get("portal.smtp_user"),
                        password=config.get("portal.smtp_password"), sender=config.get("portal.smtp_from"),
                        print_only=smtp_print or bool(config.get("portal.smtp_print")))
    return SigninSettings(mail=mail, email_code_ttl=int(config.get("portal.email_code_ttl")),
                          email_response_ms=int(config.get("portal.email_response_ms")),
                          external_url=config.get("portal.external_url"))


def run_serve(data_dir: Path, host: str, port: int, **kw: object) -> None:
    uvloop.run(serve(data_dir, host, port, **kw))  # type: ignore[arg-type]
