"""The portal's SQL layer: five methods, portable SQL, named ``:param`` placeholders.

Portable means: TEXT ids (UUIDs), INTEGER millisecond timestamps, JSON stored as TEXT, no
engine-specific functions in domain queries. A PostgreSQL backend translates ``:name`` to
``%(name)s`` and implements the same five methods.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Mapping, Protocol, Sequence

Row = dict[str, Any]
Params = Mapping[str, Any] | None


class IntegrityError(Exception):
    """A unique or foreign-key constraint was violated."""

    def __init__(self, message: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class Database(Protocol):
    def execute(self, sql: str, params: Params = None) -> int:
        """Run one statement; returns the number of rows changed."""

    def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run one statement for each parameter mapping."""

    def fetchone(self, sql: str, params: Params = None) -> Row | None:
        """The first row of a query, or None."""

    def fetchall(self, sql: str, params: Params = None) -> list[Row]:
        """Every row of a query."""

    def transaction(self) -> AbstractContextManager[None]:
        """Group statements atomically; nested calls join the outer transaction."""

    def close(self) -> None:
        """Release the connection."""
