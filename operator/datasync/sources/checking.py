"""Pre-flight checks of the source, run before anything is created on it.

Each check names what is wrong and how to fix it.  Because they all run before
the first CREATE, a failing sync leaves no publication or slot behind.
"""

from __future__ import annotations

import time

from datasync import errors, identifiers
from datasync.sources import catalog, connecting, replication

MIN_SERVER_VERSION = 140000
ACTIVE_SLOT_WAIT_SECONDS = 5.0  # a slot still held this long after the checks start is another sync's


def _setting(conn: connecting.Connection, name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return str(row[0]) if row else ""


def check_server(conn: connecting.Connection) -> None:
    version = int(_setting(conn, "server_version_num"))
    if version < MIN_SERVER_VERSION:
        raise errors.SourceError(
            f"the source runs PostgreSQL {_setting(conn, 'server_version')}; DataSync needs 14 or newer",
            "upgrade the source server",
        )
    wal_level = _setting(conn, "wal_level")
    if wal_level != "logical":
        raise errors.SourceError(
            f"the source has wal_level = {wal_level}, logical replication needs wal_level = logical",
            "run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
            "(on managed services set the parameter, e.g. rds.logical_replication = 1)",
        )
    row = conn.execute(
        "SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    user, is_super, can_replicate = row
    if not (is_super or can_replicate):
        raise errors.SourceError(
            f"role {user} lacks the REPLICATION privilege needed for logical replication slots",
            f"run as a superuser: ALTER ROLE {identifiers.quote(user)} REPLICATION;",
        )


def check_tables(conn: connecting.Connection, names: list[identifiers.TableName]) -> list[catalog.Table]:
    for name in names:
        if name.schema.lower() == identifiers.META_SCHEMA:  # (DuckDB's names ignore case)
            raise errors.SourceError(
                f"table {name} is in a schema named like {identifiers.META_SCHEMA}, where DataSync keeps its own state "
                "in the target",
                "rename the source schema: the copy keeps PostgreSQL's schema names",
            )
    tables = [catalog.describe(conn, name) for name in names]
    for table in tables:
        for leaf in {table.name, *table.leaves}:
            row = conn.execute("SELECT has_table_privilege(%s::regclass, 'SELECT')", (leaf.sql,)).fetchone()
            if not (row and row[0]):
                raise errors.SourceError(
                    f"the source user cannot read table {leaf}",
                    f"run: GRANT SELECT ON {leaf.sql} TO <the sync user>;",
                )
    return tables


def check_publication(
    conn: connecting.Connection, publication: str, tables: list[catalog.Table]
) -> None:
    """Creating or extending a publication needs table ownership (or superuser)."""
    existing = replication.publication_tables(conn, publication)
    missing = [t for t in tables if existing is None or t.name not in existing]
    if not missing:
        return
    if existing is None:
        row = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
        if not (row and row[0]):
            raise errors.SourceError(
                "the source user may not create a publication (needs CREATE on the database)",
                f"GRANT CREATE ON DATABASE <db> TO <the sync user>, or create it yourself: "
                f"CREATE PUBLICATION {identifiers.quote(publication)} FOR TABLE ...; and pass --publication",
            )
    for table in missing:
        row = conn.execute(
            "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = %s", (table.oid,)
        ).fetchone()
        if not (row and row[0]):
            raise errors.SourceError(
                f"only the owner of {table.name} may add it to a publication",
                f"have the owner run: ALTER PUBLICATION {identifiers.quote(publication)} ADD TABLE "
                f"{table.name.sql}; or grant the table's owning role to the sync user",
            )


def check_slots(conn: connecting.Connection, slot: str, need_snapshot: bool) -> None:
    """Enough free replication slots (and a WAL sender for the snapshot slot)."""
    need = (0 if replication.slot_info(conn, slot) else 1) + (1 if need_snapshot else 0)
    row = conn.execute(
        "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)"
    ).fetchone()
    free = int(row[0]) if row else 0
    if free < need:
        raise errors.SourceError(
            f"the source has {free} free replication slot(s), this sync needs {need}",
            "drop unused slots (SELECT pg_drop_replication_slot(name) FROM pg_replication_slots WHERE NOT active) "
            "or raise max_replication_slots and restart PostgreSQL",
        )
    if need_snapshot:
        row = conn.execute(
            "SELECT current_setting('max_wal_senders')::int - "
            "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')"
        ).fetchone()
        if not row or int(row[0]) < 1:
            raise errors.SourceError(
                "the source has no free WAL sender for the snapshot's replication connection",
                "raise max_wal_senders and restart PostgreSQL",
            )
    info = replication.slot_info(conn, slot)
    deadline = time.monotonic() + ACTIVE_SLOT_WAIT_SECONDS
    while info is not None and info.active and time.monotonic() < deadline:
        time.sleep(0.1)  # a sync that just died: its walsender is on its way out
        info = replication.slot_info(conn, slot)
    if info is not None and info.active:
        # before anything is changed: the other sync's publication, a snapshot into this target
        raise errors.SourceError(
            f"replication slot {slot} is in use by another process",
            "only one sync may stream a slot; stop the other one, or give this one its own --slot",
        )
    if info is not None and info.plugin != "pgoutput":
        raise errors.SourceError(
            f"replication slot {slot} exists but uses plugin {info.plugin!r}, not pgoutput",
            "drop it or choose another name with --slot",
        )
    if info is not None and info.wal_status == "lost":
        raise errors.SourceError(
            f"replication slot {slot} was invalidated (WAL it needed was removed)",
            f"drop the slot (SELECT pg_drop_replication_slot('{slot}')): the next run copies its tables anew; "
            "raise max_slot_wal_keep_size to avoid this",
        )
