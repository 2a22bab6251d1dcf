"""``fz wg``: a userspace WireGuard interface usable on its own, plus the ``wg`` key helpers."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from firezone.cli.output import AppContext, CliError

IFNAME_RE = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")


@click.group("wg")
def wg() -> None:
    """Userspace WireGuard: bring up an interface from a wg-quick file, inspect it, make keys.

    Interoperates with any standard WireGuard peer (wireguard-go, the kernel module, mobile apps).
    """


def _default_name(config: Path) -> str:
    stem = config.stem
    return stem if IFNAME_RE.match(stem) else "wg0"


@wg.command("up")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", "name", metavar="IFACE",
              help="Interface name (default: the config file's name without .conf, as wg-quick does).")
@click.option("--mtu", type=click.IntRange(576, 65535), help="Override the MTU (default: MTU= or 1280).")
@click.option("--no-routes", is_flag=True, help="Do not add routes for the peers' AllowedIPs.")
@click.option("--no-gso", is_flag=True, help="Send datagrams one by one instead of with UDP GSO.")
@click.option("--no-gro", is_flag=True, help="Do not ask the kernel for coalesced (GRO) datagrams.")
@click.option("--no-tun-offload", is_flag=True,
              help="Write TCP segments to the TUN one by one instead of merged (virtio-net GSO).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True,
              help="Directory for the control socket (default /run/firezone/wg).")
@click.pass_obj
def up(obj: AppContext, config: Path, name: str | None, mtu: int | None, no_routes: bool,
       no_gso: bool, no_gro: bool, no_tun_offload: bool, run_dir: Path | None) -> None:
    """Bring up a WireGuard interface from CONFIG and run it in the foreground.

    CONFIG is a wg-quick style file: [Interface] PrivateKey, ListenPort, Address, MTU and
    [Peer] PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive. Routes for each
    peer's AllowedIPs are added (except default routes). Stops on Ctrl-C / SIGTERM and removes
    the interface. Needs root.
    """
    from firezone import wgconf
    from firezone.roles import wg as role
    from firezone.runtime import driver
    from firezone.runtime.wg_uapi import RUN_DIR

    # importing pyroute2 (just now) resets its logger to level 0, undoing setup_logging's quieting
    logging.getLogger("pyroute2").setLevel(max(logging.WARNING, logging.getLogger().level))

    try:
        text = config.read_text()
    except OSError as e:
        raise CliError(f"cannot read {config}: {e.strerror}") from None
    try:
        cfg = wgconf.parse(text, source=str(config))
    except wgconf.WgConfigError as e:
        raise CliError(str(e)) from None
    iface = name or _default_name(config)
    if not IFNAME_RE.match(iface):
        raise CliError(f"invalid interface name {iface!r} (1-15 letters, digits, _=+.-)", exit_code=2)
    for line, key in cfg.ignored:
        click.echo(f"fz: warning: {config}: line {line}: key '{key}' is not supported by fz wg up; ignored",
                   err=True)
    try:
        role.check_root()
        w = role.WgInterface(cfg, iface, run_dir=run_dir or RUN_DIR, mtu=mtu, add_routes=not no_routes,
                             gso=not no_gso, gro=not no_gro, tun_offload=not no_tun_offload)
        driver.run(w.run_until_signal())
    except role.WgSetupError as e:
        raise CliError(str(e)) from None


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    secs = max(0, int(now - ts))
    if secs == 0:
        return "Now"
    parts: list[str] = []
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if secs >= n or (unit == "second" and not parts):
            v, secs = divmod(secs, n)
            parts.append(f"{v} {unit}{'' if v == 1 else 's'}")
    return ", ".join(parts) + " ago"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _info_dict(name: str, info: Any) -> dict[str, Any]:
    from firezone.proto.wireguard.keys import b64encode_key, public_key
    from firezone.runtime.wg_uapi import format_endpoint

    pub = info.public_key or (public_key(info.private_key) if info.private_key else None)
    return {
        "interface": name,
        "public_key": b64encode_key(pub) if pub else None,
        "listen_port": info.listen_port,
        "peers": [
            {
                "public_key": b64encode_key(p.public_key),
                "preshared_key": p.preshared_key is not None,
                "endpoint": format_endpoint(p.endpoint) if p.endpoint else None,
                "allowed_ips": p.allowed_ips,
                "latest_handshake": p.last_handshake_unix,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "persistent_keepalive": p.persistent_keepalive,
            }
            for p in info.peers
        ],
    }


def _render(d: dict[str, Any]) -> str:
    now = time.time()
    out = [f"interface: {d['interface']}",
           f"  public key: {d['public_key'] or '(none)'}",
           "  private key: (hidden)"]
    if d["listen_port"] is not None:
        out.append(f"  listening port: {d['listen_port']}")
    for p in d["peers"]:
        out.append("")
        out.append(f"peer: {p['public_key']}")
        if p["preshared_key"]:
            out.append("  preshared key: (hidden)")
        if p["endpoint"]:
            out.append(f"  endpoint: {p['endpoint']}")
        out.append(f"  allowed ips: {', '.join(p['allowed_ips']) or '(none)'}")
        if p["latest_handshake"]:
            out.append(f"  latest handshake: {_ago(p['latest_handshake'], now)}")
        if p["rx_bytes"] or p["tx_bytes"]:
            out.append(f"  transfer: {_bytes(p['rx_bytes'])} received, {_bytes(p['tx_bytes'])} sent")
        if p["persistent_keepalive"]:
            out.append(f"  persistent keepalive: every {p['persistent_keepalive']} seconds")
    return "\n".join(out)


@wg.command("show")
@click.argument("iface", required=False)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
@click.pass_obj
def show(obj: AppContext, iface: str | None, run_dir: Path | None) -> None:
    """Show running fz WireGuard interfaces: peers, endpoints, latest handshake, transfer.

    Without IFACE, every interface started by `fz wg up` on this machine is shown.
    """
    from firezone.runtime import wg_uapi

    rd = run_dir or wg_uapi.RUN_DIR
    names = [iface] if iface else wg_uapi.list_interfaces(rd)
    results = []
    for n in names:
        path = wg_uapi.socket_path(n, rd)
        try:
            info = wg_uapi.query(path)
        except FileNotFoundError:
            raise CliError(f"no fz WireGuard interface named {n!r} (no {path})") from None
        except (OSError, ValueError) as e:
            raise CliError(f"cannot query interface {n!r}: {e}") from None
        results.append(_info_dict(n, info))
    if obj.json:
        obj.emit(results if iface is None else results[0])
        return
    click.echo("\n\n".join(_render(d) for d in results) if results else "(no interfaces)")


@wg.command("genkey")
def genkey() -> None:
    """Print a new private key (base64), like `wg genkey`."""
    from firezone.proto.wireguard.keys import b64encode_key, generate_private_key
    from firezone.runtime.rng import SYSTEM_RNG

    sys.stdout.write(b64encode_key(generate_private_key(SYSTEM_RNG)) + "\n")


@wg.command("genpsk")
def genpsk() -> None:
    """Print a new preshared key (base64), like `wg genpsk`."""
    from firezone.proto.wireguard.keys import b64encode_key
    from firezone.runtime.rng import SYSTEM_RNG

    sys.stdout.write(b64encode_key(SYSTEM_RNG.token_bytes(32)) + "\n")


@wg.command("pubkey")
def pubkey() -> None:
    """Read a private key on stdin and print its public key, like `wg pubkey`.

    Example: fz wg genkey | tee private.key | fz wg pubkey > public.key
    """
    from firezone.proto.wireguard.keys import b64decode_key, b64encode_key, public_key

    data = sys.stdin.read(4096)
    try:
        priv = b64decode_key(data)
    except ValueError:
        raise CliError("key is not the correct length or format") from None
    sys.stdout.write(b64encode_key(public_key(priv)) + "\n")
