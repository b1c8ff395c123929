"""Connections to the source, with errors a user can act on.

libpq's messages are precise but terse; here we turn the common ones into a
message plus a hint.  DSNs are shown redacted, never with their password.

The engine talks to PostgreSQL through psycopg2 (:func:`connect`): it already
needs it for the replication stream and the snapshot's COPY, and importing
psycopg 3 as well cost every ``datasync sync`` ~0.15 s before its first query
(40 % of its start-up).  :func:`connect` gives psycopg2 connections psycopg 3's
``conn.execute(...)`` shortcut and closing ``with`` block, so code written
against :class:`Connection` runs on either driver.  The consistency checks keep
psycopg 3 (:func:`connect_psycopg3`) for its binary COPY.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from datasync import errors

if TYPE_CHECKING:
    import psycopg


class Connection(Protocol):
    """What the engine needs of a source connection (psycopg2 via :func:`connect`, or psycopg 3)."""

    def execute(self, query: Any, params: Any = ...) -> Any: ...

    def cursor(self) -> Any: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> Any: ...


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """psycopg2 with psycopg 3's ``execute`` shortcut and closing context manager."""

    def execute(self, query: str, params: Any = None) -> Any:
        cur = self.cursor()
        cur.execute(query, params)
        return cur

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SESSION_SETTINGS: dict[str, str] = {
    # the text forms every cast in datasync.sources.typemaps relies on
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "application_name": "datasync",
}


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", dsn)
    if "password" in params:
        params["password"] = "***"
    return " ".join(f"{k}={v}" for k, v in params.items())


def options() -> str:
    return " ".join(f"-c {k}={v.replace(' ', chr(92) + ' ')}" for k, v in SESSION_SETTINGS.items())


def _params(dsn: str) -> dict[str, Any]:
    """Connection parameters added to the DSN's: UTF-8 text whatever the database encoding (COPY
    and pgoutput convert to it; DuckDB and Arrow strings are UTF-8), and our session settings
    after any ``options`` the DSN gives (which are kept: e.g. a search_path)."""
    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        given = {}  # the connect call reports the bad DSN
    return {
        "options": f"{given.get('options', '')} {options()}".strip(),
        "client_encoding": "UTF8",
        "connect_timeout": given.get("connect_timeout", 10),
    }


def connect(dsn: str, *, autocommit: bool = True, replication: bool = False) -> _Connection:
    """A psycopg2 connection with DataSync's session settings (see the module docstring), or SourceError."""
    kwargs: dict[str, Any] = {"connection_factory": _Connection}
    if replication:
        kwargs["replication"] = "database"
    conn: _Connection = _connect2(dsn, replication, **kwargs)
    conn.autocommit = autocommit
    return conn


def connect_psycopg3(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[tuple]:  # type: ignore[type-arg]
    """A psycopg 3 connection with the same settings and errors as :func:`connect`."""
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=autocommit, **_params(dsn))
    except psycopg.ProgrammingError as exc:
        raise errors.SourceError(
            f"invalid source DSN: {exc}",
            "use a libpq URI like postgresql://user:password@host:5432/dbname",
        ) from None
    except psycopg.OperationalError as exc:
        raise explain(dsn, str(exc), False) from None


def connect_libpq2(dsn: str, *, logical_replication: bool = False) -> Any:
    """A plain psycopg2 connection (the snapshot's readers), or a logical replication one (the stream)."""
    if logical_replication:
        return _connect2(dsn, True, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    return _connect2(dsn, False)


def _connect2(dsn: str, for_replication: bool, **kwargs: Any) -> Any:
    try:
        return psycopg2.connect(dsn, **_params(dsn), **kwargs)
    except psycopg2.OperationalError as exc:
        raise explain(dsn, str(exc), for_replication) from None
    except psycopg2.ProgrammingError as exc:
        raise errors.SourceError(
            f"invalid source DSN: {exc}", "use a libpq URI like postgresql://user:password@host:5432/dbname"
        ) from None


def copy_out(conn: Any, sql: str) -> bytes:
    """The bytes of ``COPY … TO STDOUT`` on either driver."""
    if isinstance(conn, psycopg2.extensions.connection):
        buf = io.BytesIO()
        conn.cursor().copy_expert(sql, buf)
        return buf.getvalue()
    out = bytearray()
    with conn.cursor().copy(sql) as cp:
        for block in cp:
            out += block
    return bytes(out)


def explain(dsn: str, text: str, replication: bool) -> errors.SourceError:
    where = redact(dsn)
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return errors.SourceError(
            f"authentication failed for the source {where}",
            "check the user name and password in the DSN (or the Secret it comes from)",
        )
    if "does not exist" in low and "database" in low:
        return errors.SourceError(f"source database does not exist: {where}", "fix the database name in the DSN")
    if "no pg_hba.conf entry" in low:
        hint = "allow this client in pg_hba.conf"
        if replication:
            hint += " (logical replication connections match the database name, not 'replication')"
        return errors.SourceError(f"the source refuses this client: {where}", hint)
    if "connection refused" in low or "could not connect" in low or "timeout" in low or "could not translate" in low:
        return errors.SourceError(
            f"cannot reach the source PostgreSQL at {where}",
            "check host and port, that the server runs and that the network allows the connection",
        )
    first = text.strip().splitlines()[0] if text.strip() else "connection failed"
    return errors.SourceError(f"cannot connect to the source {where}: {first}")
