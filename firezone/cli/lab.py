"""``fz lab``: the network-namespace lab (the end-to-end tests' topology) for people."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from firezone.cli.output import AppContext, CliError
from firezone.lab import LAB_NAT_CHOICES, Lab, LabError, check_prerequisites
from firezone.lab import topology as topo


def _need_root() -> None:
    if os.geteuid() != 0:
        raise CliError("fz lab needs root (network namespaces, veth, nftables): run it with sudo")


def _pick(prefix: str | None) -> Lab:
    if prefix is not None:
        try:
            return Lab.load(prefix)
        except LabError as e:
            raise CliError(str(e)) from None
    prefixes = Lab.prefixes()
    if not prefixes:
        raise CliError("no lab is up (start one with: fz lab up)")
    if len(prefixes) > 1:
        raise CliError(f"several labs are up ({', '.join(prefixes)}): choose one with --prefix")
    return Lab.load(prefixes[0])


def _node_rows(lab: Lab | None) -> list[dict[str, Any]]:
    rows = []
    for name, node in topo.NODES.items():
        v4 = [topo.ip_of(i.v4) for i in node.ifaces.values()]
        v6 = [topo.ip_of(i.v6) for i in node.ifaces.values()]
        rows.append({
            "node": name,
            "namespace": lab.ns(name) if lab else f"<prefix>-{node.ns}",
            "ipv4": v4, "ipv6": v6, "what": node.description,
        })
    return rows


_NODE_COLUMNS = ["node", "namespace", "ipv4", "ipv6", "what"]

prefix_option = click.option("--prefix", metavar="PREFIX",
                             help="The lab to use (needed only when several labs are up).")


@click.group("lab")
def lab() -> None:
    """The network-namespace lab: portal, relays, NAT routers, client, gateways, resources.

    Every host is a network namespace named <prefix>-<host>; only documentation addresses are
    used and nothing is added to the host's own namespace. Needs root.

    \b
    Internet 203.0.113.0/24, 2001:db8:113::/64: portal .10, relay-1 .101, relay-2 .102,
      public-dns .53 (zone example.test), client-router .20, gateway-router .30
    Client site 192.0.2.0/25: client .10 behind client-router (NAT)
    Gateway site 192.0.2.128/25: gateway-1 .130, gateway-2 .131 behind gateway-router (NAT)
    Resource net 198.51.100.0/24, 2001:db8:51::/64 (gateways only): http .10, dns-host .20,
      download .21, iperf3 .30, private-dns .53 (zone httpbin.test)
    """


@lab.command("up")
@click.option("--nat", type=click.Choice(LAB_NAT_CHOICES), default="easy", show_default=True,
              help="easy: endpoint-independent NAT (hole punching works); symmetric: a new port per "
                   "destination (forces a relay); blocked: easy NAT, UDP between the sites dropped.")
@click.option("--loss", type=click.FloatRange(0, 100), default=0.0, show_default=True, metavar="PERCENT",
              help="Drop this share of the packets the client router forwards.")
@click.option("--prefix", metavar="PREFIX", help="Namespace prefix (default: fz + 4 random hex digits).")
@click.option("--bare", is_flag=True,
              help="Only the topology and its services (HTTP, DNS, iperf3): no portal, relays, gateways "
                   "or client.")
@click.pass_obj
def up(app: AppContext, nat: str, loss: float, prefix: str | None, bare: bool) -> None:
    """Create the lab and start the whole fz system in it.

    Starts the portal, relay-1 and relay-2, gateway-1 and gateway-2 of one site and two clients,
    seeds the account (users alice@acme.test and bob@acme.test, groups, the site, a CIDR, a DNS
    and a wildcard resource and the Internet resource with policies for alice's group), signs
    the client on `client` in as alice and the one on `client-2` as bob, and waits until both are
    connected to the portal. Everything keeps running until `fz lab down`; every component logs
    to the lab's log directory (`fz lab status` shows it). Example:

    \b
      sudo fz lab up
      sudo fz lab exec client -- curl http://dns.httpbin.test/
      sudo fz lab exec client -- fz client status
      sudo fz lab up --bare --nat symmetric --loss 5     (topology only)
      sudo fz lab down
    """
    try:
        check_prerequisites()
        the_lab = Lab.up(prefix=prefix, nat=nat, loss=loss, persistent=True)
    except (LabError, ValueError) as e:
        raise CliError(str(e)) from None
    hints: list[str] = []
    portal_url = None
    if not bare:
        from firezone.lab.system import DEMO_HINTS, start_demo

        def progress(msg: str) -> None:
            if not app.json:
                click.echo(f"lab {the_lab.prefix}: {msg}", err=True)

        try:
            sysm = start_demo(the_lab, progress)
        except (LabError, OSError) as e:
            logs = the_lab.log_dir
            the_lab.down()
            raise CliError(f"the system did not start, lab removed: {str(e).splitlines()[0]} "
                           f"(logs were in {logs})") from None
        portal_url = sysm.portal_url
        hints = [h.format(portal_url=portal_url) for h in DEMO_HINTS]
    else:
        hints = ["fz lab exec client -- ping -c1 203.0.113.10", "fz lab down"]
    data = {**the_lab.status(), "nodes": _node_rows(the_lab), "log_dir": str(the_lab.log_dir),
            "portal_url": portal_url, "try": hints}
    if app.json:
        app.emit(data)
        return
    app.table(_node_rows(the_lab), _NODE_COLUMNS, title=f"lab {the_lab.prefix}")
    what = "the fz system is up" if not bare else "the topology is up"
    app.emit(None, human=(
        f"lab [bold]{the_lab.prefix}[/bold]: {what} (NAT {nat}, loss {loss:g} %); "
        f"logs in {the_lab.log_dir}\ntry:\n" + "\n".join(f"  {h}" for h in hints)))


@lab.command("status")
@prefix_option
@click.pass_obj
def status(app: AppContext, prefix: str | None) -> None:
    """Show the labs that are up: NAT modes, loss, namespaces, processes."""
    _need_root()
    prefixes = [prefix] if prefix else Lab.prefixes()
    labs = []
    for p in prefixes:
        try:
            one = Lab.load(p)
            labs.append({**one.status(), "log_dir": str(one.log_dir)})
        except LabError as e:
            raise CliError(str(e)) from None
    if app.json:
        app.emit(labs)
        return
    if not labs:
        app.emit(None, human="no lab is up")
        return
    rows = []
    for st in labs:
        ns = st["namespaces"]
        procs = st["processes"]
        rows.append({
            "prefix": st["prefix"],
            "nat": [f"{r}={m}" for r, m in st["nat"].items()],
            "loss": [f"{r}={v:g}%" for r, v in st["loss"].items() if v] or "0",
            "udp between sites": "blocked" if st["udp_blocked"] else "allowed",
            "namespaces": f"{sum(ns.values())}/{len(ns)}",
            "processes": f"{sum(p['alive'] for p in procs)}/{len(procs)} alive",
            "owner": "fz lab up" if st["persistent"] else ("gone (stale)" if st["stale"] else "a test run"),
            "logs": st["log_dir"],
        })
    app.table(rows, list(rows[0].keys()))


@lab.command("nodes")
@prefix_option
@click.pass_obj
def nodes(app: AppContext, prefix: str | None) -> None:
    """List the lab's nodes with their namespaces and addresses."""
    the_lab = None
    if prefix is not None or (os.geteuid() == 0 and len(Lab.prefixes()) == 1):
        the_lab = _pick(prefix)
    app.table(_node_rows(the_lab), _NODE_COLUMNS)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@prefix_option
@click.argument("node", type=click.Choice(list(topo.NODES)), metavar="NODE")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(prefix: str | None, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside lab host NODE and exit with its status.

    \b
    Examples:
      fz lab exec client -- curl -sS http://203.0.113.10/
      fz lab exec gateway-1 -- dig +short download.httpbin.test
      fz lab exec client -- bash      (a shell inside the client's namespace)

    NODE is one of: internet, portal, relay-1, relay-2, public-dns, client-router, client,
    gateway-router, gateway-1, gateway-2, http, dns-host, download, iperf3, private-dns.
    """
    _need_root()
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError("missing COMMAND")
    the_lab = _pick(prefix)
    argv = the_lab.command(node, list(command))
    from firezone.lab.system import exec_env

    # So `fz client status` / `fz policy list` in the lab talk to the lab's client and portal.
    for k, v in exec_env(the_lab, node).items():
        os.environ.setdefault(k, v)
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process, so signals (Ctrl-C, kill) and the exit status are the command's own.
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise CliError(f"cannot run {argv[0]}: {e.strerror}") from None


@lab.command("down")
@prefix_option
@click.pass_obj
def down(app: AppContext, prefix: str | None) -> None:
    """Remove a lab (default: every lab and any leftover of a crashed run)."""
    _need_root()
    try:
        if prefix is not None:
            Lab.load(prefix).down()
            removed = [prefix]
        else:
            removed = Lab.down_all()
    except LabError as e:
        raise CliError(str(e)) from None
    if app.json:
        app.emit({"removed": removed})
    elif removed:
        app.emit(None, human="removed lab " + ", ".join(removed))
    else:
        app.emit(None, human="no lab was up")
