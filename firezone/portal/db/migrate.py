"""Numbered migrations (``migrations/NNNN_name.sql``), applied in order at start."""

from __future__ import annotations

import logging
import re
import time
from importlib import resources

from firezone.portal.db.sqlite import SqliteDatabase

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def available() -> list[tuple[int, str, str]]:
    out = []
    for entry in resources.files("firezone.portal.db").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(out)


def migrate(db: SqliteDatabase) -> list[int]:
    """Apply every migration not yet recorded in ``schema_migrations``; returns what ran."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
               "name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
    done = {r["version"] for r in db.fetchall("SELECT version FROM schema_migrations")}
    ran = []
    for version, name, sql in available():
        if version in done:
            continue
        with db.transaction():
            for stmt in _statements(sql):
                db.execute(stmt)
            db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (:v, :n, :t)",
                       {"v": version, "n": name, "t": int(time.time() * 1000)})
        log.info("applied migration", extra={"migration": name})
        ran.append(version)
    return ran


def _statements(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
