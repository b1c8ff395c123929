"""The DuckDB file target: user tables plus DataSync's own ``_datasync`` schema.

User tables hold exactly the source's columns.  Everything DataSync needs to
resume — the applied commit LSN, each table's snapshot LSN, state and column
layout — lives in ``_datasync`` inside the same file, so it commits atomically
with the data it describes (DESIGN.md, data path §3).

DuckDB allows one writer per file; the process that opens a target owns it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import duckdb

from datasync import errors, identifiers
from datasync.identifiers import quote

META = identifiers.META_SCHEMA
# The WAL size at which DuckDB checkpoints inside a commit: a quarter of the memory limit,
# from 16 MB (DuckDB's default) to 256 MB.  At 16 MB a CDC commit every few hundred
# thousand changes stalled for the checkpoint (measured: a commit of 2.7k changes took
# 1.06 s, the rest of the 270k-change stream 2.2 s); the stream writes the WAL back in its
# pauses instead (streaming.IDLE_CHECKPOINT_BYTES).  Not more: until a checkpoint DuckDB
# holds the updated values in memory (~2.3x the WAL; at 256 MB of WAL under a 256 MB memory
# limit a stream of updates ran out of memory at 87 MB of WAL).
CHECKPOINT_MIN, CHECKPOINT_MAX = 16 << 20, 256 << 20
_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _setting_bytes(text: str) -> int:
    """DuckDB's rendering of a size setting ('244.1 MiB') in bytes."""
    number, _, unit = text.strip().partition(" ")
    return int(float(number) * _UNITS.get(unit, 1))


@dataclasses.dataclass
class TargetColumn:
    name: str
    type_oid: int
    typmod: int
    duck_type: str
    pg_base: str
    attnum: int

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TableState:
    source: identifiers.TableName
    target: identifiers.TableName
    state: str  # snapshotting | streaming
    snapshot_lsn: int
    columns: list[TargetColumn]
    key: list[str]
    rows_snapshotted: int
    max_attnum: int = 0  # highest attnum the source table has used (dropped columns count)


class DuckTarget:
    """A DuckDB database file opened for writing by this process."""

    def __init__(self, path: str | Path, *, memory_limit: str | None = None, threads: int | None = None) -> None:
        self.path = str(path)
        try:
            self.con = duckdb.connect(self.path)
        except duckdb.IOException as exc:
            msg = str(exc)
            hint = "stop the other process that has the file open (DuckDB allows one writer per file)"
            if "lock" not in msg.lower():
                hint = "check that the path is a writable DuckDB database file"
            raise errors.TargetError(f"cannot open DuckDB target {self.path}: {msg.splitlines()[0]}", hint) from None
        if memory_limit:
            self.con.execute(f"SET memory_limit = '{memory_limit}'")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.con.execute("SET preserve_insertion_order = false")
        self.con.execute("SET enable_progress_bar = false")  # stdout is not DuckDB's
        row = self.con.execute("SELECT current_setting('memory_limit')").fetchone()
        limit = _setting_bytes(str(row[0])) if row else CHECKPOINT_MIN * 4
        threshold = max(CHECKPOINT_MIN, min(CHECKPOINT_MAX, limit // 4))
        self.con.execute(f"SET checkpoint_threshold = '{threshold}B'")
        self._ensure_meta()

    def close(self) -> None:
        self.con.close()

    def wal_bytes(self) -> int:
        """The size of the file's write-ahead log: what a checkpoint would write into the file."""
        try:
            return os.path.getsize(self.path + ".wal")
        except OSError:
            return 0

    def flush_wal(self) -> None:
        """Write the WAL back into the database file (DuckDB's CHECKPOINT).  When DuckDB cannot
        now (another transaction writes) nothing happens: the caller tries again later."""
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.TransactionException:
            pass

    # -- metadata --------------------------------------------------------------
    def _ensure_meta(self) -> None:
        self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {META}")
        self.con.execute(
            f"""CREATE TABLE IF NOT EXISTS {META}.checkpoint (
                    slot VARCHAR PRIMARY KEY,
                    applied_lsn UBIGINT NOT NULL,
                    last_commit_ts TIMESTAMPTZ,
                    updated_at TIMESTAMPTZ NOT NULL,
                    -- a transaction applied in part (schema change mid-transaction):
                    -- its commit LSN and how many of its changes are in the target
                    partial_final_lsn UBIGINT NOT NULL DEFAULT 0,
                    partial_changes BIGINT NOT NULL DEFAULT 0)"""
        )
        self.con.execute(
            f"""CREATE TABLE IF NOT EXISTS {META}.tables (
                    source_schema VARCHAR, source_table VARCHAR,
                    target_schema VARCHAR, target_table VARCHAR,
                    state VARCHAR NOT NULL,
                    snapshot_lsn UBIGINT NOT NULL,
                    columns JSON NOT NULL,
                    key JSON NOT NULL,
                    rows_snapshotted BIGINT NOT NULL,
                    max_attnum INTEGER NOT NULL,
                    updated_at TIMESTAMPTZ NOT NULL,
                    PRIMARY KEY (source_schema, source_table))"""
        )

    def applied_lsn(self, slot: str) -> int:
        return self.checkpoint(slot)[0]

    def checkpoint(self, slot: str) -> tuple[int, int, int]:
        """(applied end LSN, commit LSN of a partly applied transaction, its changes applied)."""
        row = self.con.execute(
            f"SELECT applied_lsn, partial_final_lsn, partial_changes FROM {META}.checkpoint WHERE slot = ?", [slot]
        ).fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    def checkpoint_slots(self) -> list[str]:
        """The slots this target was ever streamed through (one checkpoint row each)."""
        return [str(r[0]) for r in self.con.execute(f"SELECT slot FROM {META}.checkpoint ORDER BY 1").fetchall()]

    def write_checkpoint(
        self, slot: str, lsn: int, commit_ts_us: int | None, partial: tuple[int, int] = (0, 0)
    ) -> None:
        """Record ``lsn`` as applied; call inside the transaction that applied it."""
        ts = None if commit_ts_us is None else dt.datetime.fromtimestamp(commit_ts_us / 1e6, tz=dt.UTC)
        self.con.execute(
            f"""INSERT INTO {META}.checkpoint VALUES (?, ?, ?, now(), ?, ?)
                ON CONFLICT (slot) DO UPDATE SET applied_lsn = excluded.applied_lsn,
                    last_commit_ts = coalesce(excluded.last_commit_ts, {META}.checkpoint.last_commit_ts),
                    updated_at = now(), partial_final_lsn = excluded.partial_final_lsn,
                    partial_changes = excluded.partial_changes""",
            [slot, lsn, ts, partial[0], partial[1]],
        )

    def table_states(self) -> dict[identifiers.TableName, TableState]:
        return self.read_states(self.con)

    @staticmethod
    def read_states(con: Any) -> dict[identifiers.TableName, TableState]:
        """The synced tables of a target, also from a read-only connection."""
        rows = con.execute(
            f"""SELECT source_schema, source_table, target_schema, target_table, state, snapshot_lsn,
                       columns, key, rows_snapshotted, max_attnum FROM {META}.tables"""
        ).fetchall()
        out = {}
        for s, t, ts, tt, state, lsn, cols, key, nrows, max_attnum in rows:
            name = identifiers.TableName(s, t)
            out[name] = TableState(
                name, identifiers.TableName(ts, tt), state, int(lsn),
                [TargetColumn(**c) for c in json.loads(cols)], list(json.loads(key)), int(nrows),
                int(max_attnum),
            )
        return out

    def save_table_state(self, st: TableState) -> None:
        save_table_state(self.con, st)

    def forget_table(self, source: identifiers.TableName) -> None:
        self.con.execute(
            f"DELETE FROM {META}.tables WHERE source_schema = ? AND source_table = ?", [source.schema, source.name]
        )

    # -- user tables -------------------------------------------------------------
    def create_table(self, name: identifiers.TableName, columns: list[TargetColumn]) -> None:
        self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(name.schema)}")
        self.drop_table(name)
        cols = ", ".join(f"{quote(c.name)} {c.duck_type}" for c in columns)
        self.con.execute(f"CREATE TABLE {name.sql} ({cols})")

    def drop_table(self, name: identifiers.TableName) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS {name.sql}")

    def replace_table(self, name: identifiers.TableName, loading: identifiers.TableName) -> None:
        """Put the fully loaded ``loading`` table in place of ``name`` (same schema)."""
        self.drop_table(name)
        self.con.execute(f"ALTER TABLE {loading.sql} RENAME TO {quote(name.name)}")

    def count(self, name: identifiers.TableName) -> int:
        row = self.con.execute(f"SELECT count(*) FROM {name.sql}").fetchone()
        return int(row[0]) if row else 0

    def begin(self) -> None:
        self.con.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self.con.execute("COMMIT")

    def rollback(self) -> None:
        self.con.execute("ROLLBACK")


def arrow_stream(data: Any) -> object:
    """Arrow data (a table, a ``RecordBatchReader``) as a bare Arrow C stream, to register and scan once.

    Handed a ``pyarrow.RecordBatchReader``, DuckDB wraps it in a
    ``pyarrow.dataset`` scanner whose read-ahead kept pulling from the
    snapshot's queue: decoded chunks piled up (~1 GB of buffers alive at 5M
    rows).  Through the C stream interface DuckDB pulls a batch when it has room
    for one.  Handed the capsule itself (not a pyarrow object), DuckDB also
    skips importing ``pyarrow.dataset`` (~0.1 s of CPU with numpy and
    pyarrow.compute) to recognise what it was given.
    """
    return data.__arrow_c_stream__()


def save_table_state(con: Any, st: TableState) -> None:
    """Upsert a table's metadata row (inside the caller's transaction)."""
    con.execute(
        f"""INSERT OR REPLACE INTO {META}.tables VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())""",
        [
            st.source.schema, st.source.name, st.target.schema, st.target.name, st.state,
            st.snapshot_lsn, json.dumps([c.as_json() for c in st.columns]), json.dumps(st.key),
            st.rows_snapshotted, st.max_attnum,
        ],
    )
