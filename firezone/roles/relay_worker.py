"""A relay worker process: one more TurnServer core and UDP driver on the same listening port.

Started by :class:`firezone.roles.relay.WorkerHandle` as ``python -m firezone.roles.relay_worker``.
All workers bind the listening address with SO_REUSEPORT, so the kernel hashes each client's
5-tuple to one worker and keeps it there; every worker owns a disjoint slice of the relayed
ports, so a peer's datagram reaches the worker that holds the allocation. Protocol on the pipes:

* stdin: one JSON line of settings (the secret among them), then nothing; EOF means "stop";
* stdout: ``{"ready": true}`` (or ``{"error": "..."}``) once, then a counters snapshot per second.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from typing import Any

from firezone.logs import setup_logging

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 1.0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(settings: dict[str, Any]) -> None:
    from firezone.roles import relay as role

    cfg = role.RelayConfig(
        listen=[(h, int(p)) for h, p in settings["listen"]],
        relay_ports=(int(settings["relay_ports"][0]), int(settings["relay_ports"][1])),
        allow_loopback_peers=bool(settings.get("allow_loopback_peers")),
        max_allocations_per_user=settings.get("max_allocations_per_user"),
    )
    addrs = (settings.get("public_ip4"), settings.get("public_ip6"),
             settings.get("relay_bind4"), settings.get("relay_bind6"))
    secret = role.decode_secret(settings["secret"])
    try:
        server, driver, _bound = role.start_core(cfg, secret, addrs, cfg.relay_ports, cfg.listen,
                                                 reuse_port=True)
    except role.RelayError as e:
        _emit({"error": str(e)})
        return
    gc.freeze()  # see Relay.start
    _emit({"ready": True})
    loop = asyncio.get_running_loop()
    eof = asyncio.Event()
    # stdin EOF (the parent closed the pipe or died) is the stop signal.
    stdin: Any = sys.stdin.buffer
    loop.add_reader(stdin.fileno(), lambda: eof.set() if not stdin.read1(4096) else None)
    try:
        while not eof.is_set():
            try:
                await asyncio.wait_for(eof.wait(), SNAPSHOT_INTERVAL)
            except TimeoutError:
                pass
            _emit(role.local_snapshot(server, driver))
    finally:
        loop.remove_reader(sys.stdin.fileno())
        driver.close()


def main() -> None:
    import signal

    import uvloop

    # The parent handles SIGINT/SIGTERM and then closes our stdin; a Ctrl-C on the terminal
    # reaches the whole process group, so ignore it here and wait for the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    if not line:
        return
    settings = json.loads(line)
    level = int(settings.get("log_level", logging.INFO))
    setup_logging(0, json_lines=True)
    logging.getLogger().setLevel(level)
    try:
        uvloop.run(serve(settings))
    except BrokenPipeError:
        pass


if __name__ == "__main__":
    main()
