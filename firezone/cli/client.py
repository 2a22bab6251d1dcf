"""``fz client``: sign in through the browser, show who is signed in, sign out.

``login`` makes a random ``state`` and ``nonce``, opens (or prints) the portal's sign-in page and
waits for the callback URL ``firezone-fd0020211111://handle_client_sign_in_callback?…``. The callback
reaches it either through the desktop handler (``fz client install-handler`` registers an xdg
entry like packaging/firezone-handler.desktop that runs ``fz client handle-url URL``, which passes
the URL over a local Unix socket that only this OS user can open) or pasted at the prompt. The stored sign-in ("client" in firezone.credentials) is
``{portal, account, account_name, token, actor_name, actor_email, actor_id, expires_at, provider}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import click

from firezone import client_auth, credentials
from firezone.cli.output import AppContext, CliError

CREDENTIAL = "client"
SOCKET_NAME = "sign-in.sock"
_MAX_LINE = 16384
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux; keep a margin


@click.group()
def client() -> None:
    """Sign this device in to the portal and manage its sign-in."""


# -- the local hand-over socket -----------------------------------------------------------------


def socket_path() -> Path:
    """Where a waiting ``fz client login`` listens for ``fz client handle-url``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    from firezone.config import user_state_dir

    base = Path(runtime) / "firezone" if runtime else user_state_dir()
    path = base / SOCKET_NAME
    if len(str(path).encode()) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"fz-{os.getuid()}-{digest}" / SOCKET_NAME


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.chmod(path, 0o700)
        if path.stat().st_uid != os.getuid():
            raise CliError(f"{path} belongs to another user; cannot wait for the sign-in there")


Reply = Callable[[str], None]


class Handover:
    """A Unix socket that receives one callback URL per connection and answers ok/error."""

    def __init__(self, path: Path, inbox: queue.Queue[tuple[str, str, Reply]]) -> None:
        self.path = path
        self.inbox = inbox
        self.sock: socket.socket | None = None

    def __enter__(self) -> Self:
        _private_dir(self.path.parent)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # left over by a login that did not exit cleanly
            else:
                raise CliError("another `fz client login` is already waiting for a sign-in; finish or stop it first")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        s.listen(4)
        self.sock = s
        threading.Thread(target=self._serve, name="sign-in-handover", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                data = b""
                while b"\n" not in data and len(data) < _MAX_LINE:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                conn.close()
                continue

            def reply(text: str, conn: socket.socket = conn) -> None:
                with contextlib.suppress(OSError):
                    conn.sendall(text.encode() + b"\n")
                conn.close()

            self.inbox.put(("handler", data.decode(errors="replace").strip(), reply))


def _read_stdin(inbox: queue.Queue[tuple[str, str, Reply]]) -> None:
    for line in sys.stdin:
        if line.strip():
            inbox.put(("prompt", line.strip(), lambda _t: None))


# -- talking to the portal ----------------------------------------------------------------------


def _session_call(portal: str, account: str, token: str, method: str) -> Any:
    from firezone.portal.api_client import ApiClient

    class _Client(ApiClient):
        def url(self, path: str, params: Any = None) -> str:
            return self.base_url + path

    return _Client(portal, token, timeout=15, user_agent="fz-client").request(
        method, f"/{quote(account, safe='')}/session")


def _portal_url(app: AppContext, portal: str | None, stored: dict[str, Any] | None = None) -> str:
    url = portal or app.config.get("portal") or (stored or {}).get("portal")
    if not url:
        raise CliError("no portal given: pass --portal URL (or set FIREZONE_PORTAL_URL)")
    url = str(url).strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        raise CliError(f"invalid portal URL {url!r}: it must start with http:// or https://")
    return url


def _where(stored: credentials.Stored) -> str:
    if stored.backend == "keyring":
        return "the OS keyring"
    return f"{stored.location} (mode 0600; no keyring available)"


# -- commands -----------------------------------------------------------------------------------


@client.command("login")
@click.option("--portal", "portal", metavar="URL", help="Portal URL (default: --portal of fz, or config portal_url).")
@click.option("--account", required=True, metavar="SLUG", help="Account slug to sign in to.")
@click.option("--no-browser", is_flag=True, help="Print the sign-in URL instead of opening a browser.")
@click.option("--headless", is_flag=True,
              help="Ask for a token to copy (for machines without a browser); prints the page URL and exits.")
@click.option("--timeout", type=click.IntRange(min=1), default=600, show_default=True, metavar="SECONDS",
              help="How long to wait for the browser.")
@click.pass_obj
def login(app: AppContext, portal: str | None, account: str, no_browser: bool, headless: bool, timeout: int) -> None:
    """Sign in through the browser and store the client token for this OS user.

    Opens the portal's sign-in page for the account. When the sign-in succeeds, the browser hands
    the result back through the firezone-fd0020211111:// link (registered by the fz desktop
    handler); without the handler, copy the link from the page and paste it here. The token goes
    to the OS keyring, or to a 0600 file when no keyring exists.
    """
    url_base = _portal_url(app, portal)
    account = account.strip()
    if headless:
        url = f"{url_base}/{quote(account, safe='')}?as=headless-client"
        app.emit({"url": url}, human=f"Open this page on any device, sign in and copy the token it shows:\n{url}\n"
                 "Then give it to this machine as FIREZONE_TOKEN or in a file passed with --token-file.")
        return
    state, nonce = client_auth.random_hex(32), client_auth.random_hex(32)
    url = client_auth.sign_in_url(url_base, account, state=state, nonce=nonce)
    inbox: queue.Queue[tuple[str, str, Reply]] = queue.Queue()
    with Handover(socket_path(), inbox):
        opened = False
        if not no_browser:
            try:
                opened = webbrowser.open(url)
            except webbrowser.Error:
                opened = False
        err = sys.stderr
        if opened:
            click.echo(f"Opened your browser to sign in to {account}. If it did not open, visit:\n{url}", file=err)
        else:
            click.echo(f"To sign in to {account}, open this URL in a browser:\n{url}", file=err)
        click.echo("Waiting for the sign-in to finish in the browser "
                   "(or paste the firezone-fd0020211111:// link from the page here)...", file=err)
        if sys.stdin is not None and not sys.stdin.closed:
            threading.Thread(target=_read_stdin, args=(inbox,), name="sign-in-prompt", daemon=True).start()
        cb = _wait_callback(inbox, state, account, timeout)
    token = client_auth.assemble_token(nonce, cb.fragment)
    from firezone.portal.api_client import ApiError

    try:
        info = _session_call(url_base, account, token, "GET")["data"]
    except ApiError as e:
        raise CliError(f"the portal did not accept the new sign-in: {e.detail}") from None
    actor = info["actor"]
    value = {"portal": url_base, "account": info["account"]["slug"], "account_name": info["account"]["name"],
             "account_id": info["account"]["id"], "token": token, "actor_name": actor["name"],
             "actor_email": actor["email"], "actor_id": actor["id"], "expires_at": info["token"]["expires_at"],
             "provider": info["token"]["provider"], "token_id": info["token"]["id"]}
    stored = credentials.store(CREDENTIAL, value)
    data = {k: v for k, v in value.items() if k != "token"} | {"token_stored_in": stored.location}
    app.emit(data, human=(
        f"Signed in as [bold]{actor['name']}[/bold] ({actor['email']}) to account "
        f"[bold]{info['account']['name']}[/bold] ({info['account']['slug']}) at {url_base}\n"
        f"token stored in {_where(stored)}; valid until {info['token']['expires_at']}"))


def _wait_callback(inbox: queue.Queue[tuple[str, str, Reply]], state: str, account: str,
                   timeout: int) -> client_auth.Callback:
    import time

    deadline = time.monotonic() + timeout
    err = sys.stderr
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CliError(f"no sign-in arrived within {timeout} s; run `fz client login` again")
        try:
            source, text, reply = inbox.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        try:
            cb = client_auth.parse_callback(text)
        except client_auth.CallbackError as e:
            reply(f"error: {e}")
            click.echo(f"fz: that is not the sign-in link ({e}); paste the firezone-fd0020211111:// link "
                       "shown on the page", file=err)
            continue
        if not client_auth.state_matches(state, cb.state):
            reply("error: refused: state mismatch")
            raise CliError("refused the sign-in: its state does not match the one this login started "
                           "(a stale or forged link); run `fz client login` again")
        if cb.account_slug != account:
            reply("error: refused: another account")
            raise CliError(f"refused the sign-in: it is for account {cb.account_slug!r}, not {account!r}")
        reply("ok")
        if source == "handler":
            click.echo("Received the sign-in from the browser.", file=err)
        return cb


@client.command("handle-url")
@click.argument("url")
@click.pass_obj
def handle_url(app: AppContext, url: str) -> None:
    """Pass a firezone-fd0020211111:// sign-in link to the waiting `fz client login`.

    The desktop handler (firezone-handler.desktop) runs this when the browser opens the link.
    """
    try:
        client_auth.parse_callback(url)
    except client_auth.CallbackError as e:
        raise CliError(str(e)) from None
    path = socket_path()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        s.connect(str(path))
        s.sendall(url.strip().encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            answer += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError("no `fz client login` is waiting for a sign-in; start it first, then sign in again") from None
    except OSError as e:
        raise CliError(f"cannot hand the sign-in to `fz client login`: {e.strerror or e}") from None
    finally:
        s.close()
    text = answer.decode(errors="replace").strip()
    if text != "ok":
        raise CliError(f"`fz client login` did not take the sign-in: {text.removeprefix('error: ') or 'no answer'}")
    app.emit({"handed_over": True}, human="Handed the sign-in to the waiting `fz client login`.")


HANDLER_FILE = "firezone-handler.desktop"
SCHEME_MIME = f"x-scheme-handler/{client_auth.SCHEME}"


def handler_desktop_entry(fz_path: str) -> str:
    """The xdg desktop entry that hands sign-in links to ``fz client handle-url``."""
    return ("[Desktop Entry]\nType=Application\nName=fz sign-in handler\n"
            "Comment=Completes fz client sign-in from the browser\n"
            f"Exec={fz_path} client handle-url %u\nTerminal=false\nNoDisplay=true\n"
            f"MimeType={SCHEME_MIME};\nCategories=Network;\n")


def _set_default_handler(mimeapps: Path) -> None:
    """Make our entry the default for the scheme in mimeapps.list, keeping every other line."""
    lines = mimeapps.read_text().splitlines() if mimeapps.exists() else []
    out: list[str] = []
    section = None
    placed = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if section == "[Default Applications]" and not placed:
                out.append(f"{SCHEME_MIME}={HANDLER_FILE}")
                placed = True
            section = stripped
        elif section == "[Default Applications]" and stripped.split("=", 1)[0].strip() == SCHEME_MIME:
            continue
        out.append(line)
    if not placed:
        if section != "[Default Applications]":
            if "[Default Applications]" in (x.strip() for x in out):
                raise CliError(f"cannot edit {mimeapps}: unusual layout; add {SCHEME_MIME}={HANDLER_FILE} "
                               "under [Default Applications] yourself")
            out.append("[Default Applications]")
        out.append(f"{SCHEME_MIME}={HANDLER_FILE}")
    mimeapps.parent.mkdir(parents=True, exist_ok=True)
    mimeapps.write_text("\n".join(out) + "\n")


@client.command("install-handler")
@click.pass_obj
def install_handler(app: AppContext) -> None:
    """Register fz for firezone-fd0020211111:// links (xdg desktop entry for this OS user).

    Afterwards the browser hands the sign-in result straight to a waiting `fz client login`.
    """
    import platformdirs

    fz_path = shutil.which("fz") or f"{sys.executable} -m firezone"
    apps = Path(platformdirs.user_data_dir("applications", appauthor=False, roaming=False))
    apps.mkdir(parents=True, exist_ok=True)
    entry = apps / HANDLER_FILE
    entry.write_text(handler_desktop_entry(fz_path))
    mimeapps = Path(platformdirs.user_config_dir()) / "mimeapps.list"
    _set_default_handler(mimeapps)
    app.emit({"desktop_entry": str(entry), "mimeapps": str(mimeapps)},
             human=f"Registered {entry} for {client_auth.SCHEME}:// links (default set in {mimeapps})")


def _stored_or_fail() -> dict[str, Any]:
    stored = credentials.load(CREDENTIAL)
    if not stored or not stored.get("token"):
        raise CliError("not signed in: run `fz client login --portal URL --account SLUG`")
    return stored


@client.command("whoami")
@click.pass_obj
def whoami(app: AppContext) -> None:
    """Show who this device is signed in as, checked with the portal."""
    from firezone.portal.api_client import ApiError

    stored = _stored_or_fail()
    try:
        info = _session_call(stored["portal"], stored["account"], stored["token"], "GET")["data"]
    except ApiError as e:
        if e.status in (401, 403, 404):
            raise CliError(f"the stored sign-in is no longer valid ({e.detail}); run `fz client login` again") from None
        data = {k: v for k, v in stored.items() if k != "token"} | {"verified": False, "error": e.detail}
        app.emit(data, human=(f"{stored.get('actor_name')} ({stored.get('actor_email')}) on account "
                              f"{stored.get('account')} at {stored.get('portal')} "
                              f"[yellow](not checked: {e.detail})[/yellow]"))
        return
    data = {"portal": stored["portal"], "account": info["account"], "actor": info["actor"],
            "expires_at": info["token"]["expires_at"], "provider": info["token"]["provider"], "verified": True}
    app.emit(data, human=(f"Signed in as [bold]{info['actor']['name']}[/bold] ({info['actor']['email']}) "
                          f"to account [bold]{info['account']['name']}[/bold] ({info['account']['slug']}) "
                          f"at {stored['portal']}\nvia {info['token']['provider'] or '-'}, "
                          f"valid until {info['token']['expires_at']}"))


@client.command("logout")
@click.pass_obj
def logout(app: AppContext) -> None:
    """Revoke this device's token at the portal and forget it locally."""
    from firezone.portal.api_client import ApiError

    stored = _stored_or_fail()
    revoked = True
    note = ""
    try:
        _session_call(stored["portal"], stored["account"], stored["token"], "DELETE")
    except ApiError as e:
        revoked = False
        if e.status in (401, 403):
            note = " (the portal had already ended that sign-in)"
        else:
            note = f" [yellow](could not revoke it at the portal: {e.detail})[/yellow]"
    credentials.delete(CREDENTIAL)
    app.emit({"signed_out": True, "revoked": revoked},
             human=f"Signed out of {stored.get('account')} at {stored.get('portal')}{note}")


def load_sign_in(token_file: Path | None = None) -> dict[str, Any] | None:
    """The client sign-in to use: ``FIREZONE_TOKEN``, else ``token_file``, else the stored one.

    Headless machines get a token from an admin (``fz token create client``) or from the
    ``as=headless-client`` page and pass it by environment or file; the result then holds only
    ``token`` and ``source`` (the portal URL comes from the configuration).
    """
    env = os.environ.get("FIREZONE_TOKEN", "").strip()
    if env:
        return {"token": env, "source": "env FIREZONE_TOKEN"}
    if token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as e:
            raise CliError(f"cannot read the token file {token_file}: {e.strerror}") from None
        if not text:
            raise CliError(f"the token file {token_file} is empty")
        return {"token": text, "source": str(token_file)}
    stored = credentials.load(CREDENTIAL)
    if stored and stored.get("token"):
        return {**stored, "source": "stored sign-in"}
    return None


# -- running the client ---------------------------------------------------------------------------

CLIENT_ID_FILE = Path("/var/lib/firezone/client-id")


def _client_id(explicit: str | None) -> str:
    """``--id`` / ``FIREZONE_ID``, else a UUID kept in /var/lib/firezone/client-id."""
    import uuid

    if explicit:
        return explicit
    with contextlib.suppress(OSError):
        text = CLIENT_ID_FILE.read_text().strip()
        if text:
            return text
    new = str(uuid.uuid4())
    with contextlib.suppress(OSError):
        CLIENT_ID_FILE.parent.mkdir(parents=True, exist_ok=True)
        CLIENT_ID_FILE.write_text(new + "\n")
    return new


def _control_path(value: Path | None) -> Path:
    from firezone.runtime.control_socket import default_path

    return value or default_path()


_control_option = click.option(
    "--control-socket", "control_socket", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
    help="UNIX socket of the running client (default: FIREZONE_CONTROL_SOCKET or /run/firezone/client.sock).")


@client.command("up")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Read a client token from FILE (headless machines; FIREZONE_TOKEN wins).")
@click.option("--dns-control", "dns_control", type=click.Choice(["etc-resolv-conf", "systemd-resolved", "none"]),
              envvar="FIREZONE_DNS_CONTROL", default="etc-resolv-conf", show_default=True,
              help="How to point the system resolver at the tunnel's DNS stub.")
@click.option("--id", "external_id", envvar="FIREZONE_ID", metavar="ID",
              help="This device's stable identity (default: a UUID kept in /var/lib/firezone/client-id).")
@click.option("--name", envvar="FIREZONE_NAME", metavar="NAME", help="Device name shown in the portal (default: hostname).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="UDP port for the tunnel (0: any free port).")
@click.option("--account", envvar="FIREZONE_ACCOUNT", metavar="SLUG",
              help="Account of a token given by FIREZONE_TOKEN / --token-file, to show its user in `status`.")
@click.option("--roam-detect/--no-roam-detect", "roam_detect", default=True, show_default=True,
              help="Reconnect when the host's addresses or default routes change.")
@click.option("--internet", "internet", type=click.Choice(["on", "off"]), default="off", show_default=True,
              help="Start with the Internet resource routed (all traffic through its gateway); "
                   "`fz client internet on|off` changes it while running.")
@_control_option
@click.pass_obj
def up(app: AppContext, token_file: Path | None, dns_control: str, external_id: str | None, name: str | None,
       port: int, account: str | None, roam_detect: bool, internet: str, control_socket: Path | None) -> None:
    """Connect this device: TUN tun-firezone, routes, DNS, tunnels on demand (foreground).

    The token is FIREZONE_TOKEN, else --token-file, else the sign-in stored by
    `fz client login`. Resources are reached on first use: the client asks the portal for
    access, holds the packets, connects to the gateway and sends them. Ctrl-C / SIGTERM stops
    and restores the resolver configuration; SIGHUP reconnects to the portal. When the host's
    addresses or default routes change, the client reconnects to the portal and builds its
    tunnels afresh from the new address (--no-roam-detect turns that off).

    \b
    Examples:
      fz client up
      FIREZONE_TOKEN=... fz --portal https://portal.example.com client up --dns-control none
    """
    from firezone.roles.client import ClientFailure, ClientRole
    from firezone.runtime import driver
    from firezone.runtime.control_socket import ControlSocketError

    sign_in = load_sign_in(token_file)
    if sign_in is None:
        raise CliError("not signed in: run `fz client login --portal URL --account SLUG`, or give a token "
                       "with FIREZONE_TOKEN or --token-file")
    portal = app.config.get("portal") or sign_in.get("portal")
    if not portal:
        raise CliError("no portal URL: pass --portal URL (before `client`) or set portal_url in the config")
    if os.geteuid() != 0:
        raise CliError("fz client up needs root (TUN device, routes, resolver configuration)")
    account = account or sign_in.get("account")
    if account and not sign_in.get("actor_email"):
        sign_in = {**sign_in, **_who(str(portal), str(account), str(sign_in["token"]))}
    role = ClientRole(str(portal), str(sign_in["token"]), external_id=_client_id(external_id),
                      name=name or socket.gethostname(), dns_control_mode=dns_control, port=port,
                      control_path=_control_path(control_socket), sign_in=sign_in, roam_detect=roam_detect,
                      internet=internet == "on")
    try:
        driver.run(role.run())
    except (ClientFailure, ControlSocketError) as e:
        raise CliError(str(e)) from None


def _who(portal: str, account: str, token: str) -> dict[str, Any]:
    """The user a token speaks for (best effort: the client runs without it)."""
    from firezone.portal.api_client import ApiError

    try:
        info = _session_call(portal, account, token, "GET")["data"]
    except (ApiError, OSError, KeyError, TypeError) as e:
        logging.getLogger(__name__).debug("cannot ask the portal who the token is", extra={"error": str(e)})
        return {"account": account}
    return {"account": account, "actor_name": info["actor"]["name"], "actor_email": info["actor"]["email"]}


def _ask(control_socket: Path | None, cmd: str, **args: Any) -> dict[str, Any]:
    from firezone.runtime.control_socket import ControlSocketError, query

    try:
        answer = query(_control_path(control_socket), {"cmd": cmd, **args})
    except ControlSocketError as e:
        raise CliError(f"{e}; start it with `fz client up`") from None
    if "error" in answer:
        raise CliError(str(answer["error"]))
    return answer


def _status_text(r: dict[str, Any]) -> str:
    """``forbidden (remote_ip)``: a refusal with the policy conditions that did not hold."""
    violated = r.get("violated_properties") or []
    return f"{r['status']} ({', '.join(violated)})" if violated else str(r["status"])


def _resource_rows(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": r["name"], "type": r["type"], "address": r.get("address") or "-",
             "site": (r.get("site") or {}).get("name") or "-", "status": _status_text(r)} for r in resources]


@client.command("status")
@_control_option
@click.pass_obj
def status(app: AppContext, control_socket: Path | None) -> None:
    """Show the running client: user, resources with site and status, gateway connections."""
    st = _ask(control_socket, "status")
    if app.json:
        app.emit(st)
        return
    user = st.get("user") or {}
    who = user.get("email") or user.get("name") or f"token from {user.get('source') or '?'}"
    portal = st.get("portal") or {}
    iface = st.get("interface") or {}
    app.console.print(f"Signed in as [bold]{who}[/bold]; portal {portal.get('url')} "
                      f"({'connected' if portal.get('connected') else 'reconnecting'}); "
                      f"tunnel {iface.get('ipv4') or '-'} {iface.get('ipv6') or ''}", highlight=False)
    app.table(_resource_rows(st.get("resources") or []), ["name", "type", "address", "site", "status"],
              title="Resources")
    conns = [{"gateway": c["gateway_id"], "site": c.get("site_name") or c.get("site_id") or "-",
              "state": c["state"], "path": c.get("path") or "-",
              "rtt_ms": "-" if c.get("rtt_ms") is None else c["rtt_ms"],
              "rx_bytes": c.get("rx_bytes", 0), "tx_bytes": c.get("tx_bytes", 0)} for c in st.get("connections") or []]
    app.table(conns, ["gateway", "site", "state", "path", "rtt_ms", "rx_bytes", "tx_bytes"], title="Connections")


@client.command("resources")
@_control_option
@click.pass_obj
def resources(app: AppContext, control_socket: Path | None) -> None:
    """List the resources this client may use, with their site and status."""
    res = _ask(control_socket, "resources")["resources"]
    if app.json:
        app.emit(res)
        return
    app.table(_resource_rows(res), ["name", "type", "address", "site", "status"])


@client.command("internet")
@click.argument("switch", required=False, type=click.Choice(["on", "off"]))
@_control_option
@click.pass_obj
def internet(app: AppContext, switch: str | None, control_socket: Path | None) -> None:
    """Route all traffic through the Internet resource (on), or only resources (off; the default).

    Without an argument, show the current setting. With it on, everything but fz's own
    connections goes through the Internet resource's gateway; a policy must give the user the
    Internet resource for that to take effect. The setting lasts until the client stops
    (`fz client up --internet on` starts with it on).
    """
    answer = _ask(control_socket, "internet", **({"on": switch == "on"} if switch else {}))
    if app.json:
        app.emit(answer)
        return
    text = f"Internet resource {'on' if answer['enabled'] else 'off'}"
    if answer["enabled"] and not answer["offered"]:
        text += " (no policy gives you the Internet resource yet: traffic stays outside the tunnel)"
    app.console.print(text, highlight=False)
