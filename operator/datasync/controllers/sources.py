"""The operator's side of the PostgreSQL source: the DSN from the Secret, the connection.

Why the operator connects at all (the worker does the syncing): it owns what must exist
before a writer starts and outlive it — the publication and the replication slot — and it
must remove them when the last table or the policy goes, even when no writer runs (a slot
nobody reads retains WAL until the primary's disk fills).

The DSN is read from the Secret on every use and kept in no status, event, log line or
exception message: errors carry :func:`datasync.sources.connecting.redact`-ed text only
(the engine's own messages already are).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator

import psycopg2
import psycopg2.errors

from datasync import errors, identifiers, kube
from datasync.api import SyncPolicy
from datasync.sources import connecting


class SourceProblem(Exception):
    """Why the source cannot be used: ``reason`` (a condition reason) and a message without secrets."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def read_dsn(client: kube.Kube, policy: SyncPolicy) -> str:
    ref = policy.spec.source.secret_ref
    namespace = policy.metadata.namespace or ""
    try:
        secret = client.get(kube.path("v1", "secrets", namespace, ref.name))
    except kube.ApiError as exc:
        raise SourceProblem("SecretUnreadable", f"cannot read Secret {namespace}/{ref.name}: {exc.reason}") from None
    if secret is None:
        raise SourceProblem("SecretNotFound", f"Secret {namespace}/{ref.name} does not exist")
    data = secret.get("data") or {}
    if ref.key not in data:
        raise SourceProblem("SecretKeyNotFound", f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
    try:
        return base64.b64decode(data[ref.key]).decode().strip()
    except (ValueError, UnicodeDecodeError):
        raise SourceProblem("SecretInvalid", f"key {ref.key!r} of Secret {namespace}/{ref.name} is not UTF-8 text") from None


def describe(exc: errors.DataSyncError) -> str:
    """The engine's message and hint (they never contain a password)."""
    return f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message


@contextlib.contextmanager
def connect(client: kube.Kube, policy: SyncPolicy) -> Iterator[connecting.Connection]:
    """An autocommit connection to the policy's source, or :class:`SourceProblem`."""
    dsn = read_dsn(client, policy)
    try:
        conn = connecting.connect(dsn)
    except errors.SourceError as exc:
        raise SourceProblem("SourceUnreachable", describe(exc)) from None
    try:
        yield conn
    finally:
        conn.close()


def publication_exists(conn: connecting.Connection, publication: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone() is not None


def create_empty_publication(conn: connecting.Connection, publication: str) -> None:
    """``CREATE PUBLICATION`` without tables; SyncTables add theirs (as the engine would)."""
    conn.execute(f"CREATE PUBLICATION {identifiers.quote(publication)} WITH (publish_via_partition_root = true)")


def table_exists(conn: connecting.Connection, table: identifiers.TableName) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table.sql,)).fetchone()
    return bool(row and row[0])


def drop_slot_forcibly(conn: connecting.Connection, slot: str) -> None:
    """Drop ``slot``, ending the session that streams from it first (a writer that is going away)."""
    for _ in range(20):
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if row is None:
            return
        if row[0] is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        except psycopg2.errors.ObjectInUse:
            time.sleep(0.25)  # the terminated walsender has not exited yet
        except psycopg2.errors.UndefinedObject:
            return
    raise SourceProblem("SlotInUse", f"replication slot {slot} stays in use; drop it by hand")
