"""SQLite backend: WAL, foreign keys on, one connection used from the event-loop thread."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from firezone.portal.db.api import IntegrityError, Params, Row


def _row_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class SqliteDatabase:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = _row_factory
        self._conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._depth = 0
        self._lock = threading.RLock()

    def _run(self, sql: str, params: Params) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, dict(params or {}))
        except sqlite3.IntegrityError as e:
            raise IntegrityError(str(e), _constraint_of(str(e))) from None

    def execute(self, sql: str, params: Params = None) -> int:
        with self._lock:
            return self._run(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            try:
                self._conn.executemany(sql, [dict(r) for r in rows])
            except sqlite3.IntegrityError as e:
                raise IntegrityError(str(e), _constraint_of(str(e))) from None

    def fetchone(self, sql: str, params: Params = None) -> Row | None:
        with self._lock:
            row: Row | None = self._run(sql, params).fetchone()
            return row

    def fetchall(self, sql: str, params: Params = None) -> list[Row]:
        with self._lock:
            return list(self._run(sql, params).fetchall())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._conn.execute("ROLLBACK")
                raise
            else:
                self._depth -= 1
                if outer:
                    self._conn.execute("COMMIT")

    def executescript(self, script: str) -> None:
        with self._lock:
            self._conn.executescript(script)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _constraint_of(message: str) -> str | None:
    # "UNIQUE constraint failed: groups.account_id, groups.name"
    if ":" in message:
        return message.split(":", 1)[1].strip()
    return None
