"""Publications and logical replication slots on the source.

One publication and one ``pgoutput`` slot per sync.  Their names derive from the
target file so two syncs of one database never share a slot (override with
``--slot``/``--publication``).  Changes are streamed by ``sources.receiving``.
Snapshots take a *temporary* slot with an exported snapshot; its consistent
point is the exact LSN at which the snapshot's data ends and the change stream
begins for that table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from datasync import identifiers
from datasync.engine import pgoutput
from datasync.sources import connecting

PROTO_VERSION = 1


def derive_name(target_path: str) -> str:
    """``datasync_<stem>_<hash>``: a valid slot/publication name for a target file."""
    absolute = str(Path(target_path).resolve())
    stem = re.sub(r"[^a-z0-9_]", "_", Path(target_path).stem.lower())[:30].strip("_") or "target"
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    return f"datasync_{stem}_{digest}"


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str
    confirmed_flush: int
    restart_lsn: int
    active: bool
    wal_status: str | None


def slot_info(conn: connecting.Connection, slot: str) -> SlotInfo | None:
    row = conn.execute(
        """SELECT slot_name, plugin, confirmed_flush_lsn::text, restart_lsn::text, active, wal_status
           FROM pg_replication_slots WHERE slot_name = %s""",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(
        row[0], row[1] or "",
        pgoutput.parse_lsn(row[2]) if row[2] else 0,
        pgoutput.parse_lsn(row[3]) if row[3] else 0,
        bool(row[4]), row[5],
    )


def publication_tables(conn: connecting.Connection, publication: str) -> set[identifiers.TableName] | None:
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if not exists:
        return None
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid "
        "JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.pubname = %s",
        (publication,),
    ).fetchall()
    return {identifiers.TableName(s, t) for s, t in rows}


def _only(tables: list[identifiers.TableName]) -> str:
    # ONLY: an inheritance parent's child tables must not join the publication (the copy reads
    # the parent ONLY; and a child without a replica identity then refuses UPDATE and DELETE on
    # the source).  A partitioned table still publishes its partitions, through the root.
    return ", ".join(f"ONLY {t.sql}" for t in tables)


def create_publication(conn: connecting.Connection, publication: str, tables: list[identifiers.TableName]) -> None:
    names = _only(tables)
    conn.execute(
        f"CREATE PUBLICATION {identifiers.quote(publication)} FOR TABLE {names} "
        "WITH (publish_via_partition_root = true)"
    )


def add_tables(conn: connecting.Connection, publication: str, tables: list[identifiers.TableName]) -> None:
    if tables:
        conn.execute(f"ALTER PUBLICATION {identifiers.quote(publication)} ADD TABLE {_only(tables)}")


def drop_tables(conn: connecting.Connection, publication: str, tables: list[identifiers.TableName]) -> None:
    if tables:
        conn.execute(f"ALTER PUBLICATION {identifiers.quote(publication)} DROP TABLE {_only(tables)}")


def drop_publication(conn: connecting.Connection, publication: str) -> None:
    conn.execute(f"DROP PUBLICATION IF EXISTS {identifiers.quote(publication)}")


def drop_slot(conn: connecting.Connection, slot: str) -> None:
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))


def create_slot(conn: connecting.Connection, slot: str) -> int:
    row = conn.execute(
        "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)
    ).fetchone()
    assert row is not None
    return pgoutput.parse_lsn(row[0])




def current_lsn(conn: connecting.Connection) -> int:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return pgoutput.parse_lsn(row[0])


def flushed_lsn(conn: connecting.Connection) -> int:
    """The WAL position logical decoding can read up to.

    Commits made with ``synchronous_commit = off`` are visible before their WAL
    is flushed; decoding (and so the slot) must never be moved past this point.
    """
    row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    return pgoutput.parse_lsn(row[0])


def wait_flushed(conn: connecting.Connection, timeout: float = 30.0) -> int:
    """Wait until everything committed so far is flushed; return that position."""
    import time

    target = current_lsn(conn)
    deadline = time.monotonic() + timeout
    while True:
        flushed = flushed_lsn(conn)
        if flushed >= target or time.monotonic() > deadline:
            return min(flushed, target) if flushed >= target else flushed
        time.sleep(0.02)






@dataclasses.dataclass
class ExportedSnapshot:
    snapshot_id: str
    consistent_lsn: int


@contextlib.contextmanager
def exported_snapshot(dsn: str, slot_name: str) -> Iterator[ExportedSnapshot]:
    """A temporary slot whose exported snapshot stays valid inside the block.

    Readers ``SET TRANSACTION SNAPSHOT`` to it; changes with commit LSN at or
    after ``consistent_lsn`` are exactly those the snapshot does not contain.
    """
    conn = connecting.connect(dsn, replication=True)
    try:
        cur = conn.cursor()
        cur.execute(
            f"CREATE_REPLICATION_SLOT {identifiers.quote(slot_name)} TEMPORARY LOGICAL pgoutput "
            "(SNAPSHOT 'export')"
        )
        row = cur.fetchone()
        assert row is not None
        yield ExportedSnapshot(snapshot_id=row[2], consistent_lsn=pgoutput.parse_lsn(row[1]))
    finally:
        conn.close()  # drops the temporary slot
