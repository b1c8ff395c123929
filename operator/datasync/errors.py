"""Errors a user can act on.

Every failure that reaches the user carries *what* is wrong and *how to fix it*
(``hint``).  The CLI prints both on stderr and exits non-zero; nothing else in
the codebase formats user-facing errors.  Messages never contain a password:
DSNs are shown through :func:`datasync.sources.connecting.redact`.
"""

from __future__ import annotations


class DataSyncError(Exception):
    """Base of all expected, user-actionable errors."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class SourceError(DataSyncError):
    """The PostgreSQL source cannot be used as asked (connection, config, table)."""

    exit_code = 2


class TargetError(DataSyncError):
    """The DuckDB target cannot be used (locked, unreadable, incompatible)."""

    exit_code = 3


def value_out_of_range(what: str, detail: str, consequence: str) -> TargetError:
    """A value DuckDB's type cannot hold (see the README's type table)."""
    return TargetError(
        f"{what}: {detail}",
        "DuckDB cannot hold some values PostgreSQL accepts: timestamps after 294247-01-10, interval "
        "'infinity' and intervals of 1,000,000,000 hours or more, json with an unpaired surrogate "
        f"escape (\\ud800); {consequence}",
    )
