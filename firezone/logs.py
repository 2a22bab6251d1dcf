"""Logging setup: rich on a terminal, JSON lines otherwise, and a TRACE level for per-packet lines.

Level policy (after Firezone's): ERROR = something is broken and needs a human; WARN = degraded but
working; INFO = lifecycle events a operator wants to see (started, connected, flow completed);
DEBUG = decisions and state changes; TRACE = one line per packet. Addresses and domain names are
logged at DEBUG or below; keys and secrets never.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _extra_fields(record).items():
            out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KeyValueFormatter(logging.Formatter):
    """Plain text with the extra fields appended as key=value (used under rich)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        fields = _extra_fields(record)
        if fields:
            msg += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return msg


class _QuietLibraries(logging.Filter):
    """Drop chatty third-party records below WARNING, whatever their loggers' levels say.

    pyroute2 resets its own logger's level when imported, so a logger-level setting alone does not
    hold.
    """

    PREFIXES = ("pyroute2", "asyncio", "aiohttp.access")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(self.PREFIXES)


def level_for(verbosity: int, quiet: bool = False) -> int:
    if quiet:
        return logging.WARNING
    return {0: logging.INFO, 1: logging.DEBUG}.get(verbosity, TRACE)


def setup_logging(verbosity: int = 0, *, json_lines: bool | None = None, stream: Any = None) -> None:
    """Configure the root logger once per process.

    ``json_lines=None`` picks JSON when the stream is not a terminal.
    """
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not (hasattr(stream, "isatty") and stream.isatty())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if json_lines:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=stream), show_path=False, rich_tracebacks=False)
        handler.setFormatter(KeyValueFormatter())
    handler.addFilter(_QuietLibraries())
    root.addHandler(handler)
    root.setLevel(level_for(verbosity))


def trace(logger: logging.Logger, msg: str, **fields: Any) -> None:
    """Log a per-packet line at TRACE; cheap when TRACE is off."""
    if logger.isEnabledFor(TRACE):
        logger.log(TRACE, msg, extra=fields)
