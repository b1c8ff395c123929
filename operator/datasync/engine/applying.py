"""Fold changes per key and apply them to DuckDB with set-based SQL.

Changes for a table accumulate in a dict keyed by primary key (the last change
per key wins, so a batch touches each row once).  A flush stages the folded rows
as one Arrow table of PostgreSQL text values (built in C) and applies them with
one MERGE: delete the deleted keys, update in place the rows that stay, insert
the keys the copy lacks.  In-place updates matter: delete + re-insert
leaves DuckDB's checkpoint to vacuum every touched row group (measured 25%
slower overall, six times the WAL).  Rows holding unchanged-TOAST markers take
the general path: compute the new rows (keeping the target's value for those
columns), delete every touched key, insert.  Row-at-a-time SQL would be orders
of magnitude slower.  Flushes happen inside the caller's DuckDB transaction;
only the caller commits, together with the checkpoint LSN.

The common changes (inserts, deletes, updates that keep the key and carry every
value) are folded by ``fold_changes``, a whole run of messages per call, in C:
the per-change Python calls cost more than everything else on the CDC path.
Whatever it declines goes through ``TableApplier.insert/update/delete``.

Schema changes arrive as pgoutput Relation messages.  The first change after a
new Relation layout reconciles the target table with it: drops, renames
(matched through the source's attnum), type changes and added columns; values
PostgreSQL materialised without WAL (an added column's default, a rewritten
column after ALTER TYPE) are back-filled from the source.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any, Final

import duckdb
import pyarrow as pa

from datasync import errors, identifiers
from datasync.engine import pgoutput
from datasync.identifiers import quote
from datasync.sources import catalog, connecting, typemaps
from datasync.targets import duckfile

log = logging.getLogger(__name__)

UPSERT, DELETE = 0, 1
_JSON = pa.json_(pa.large_string())


# a folded change: (op, values, lookup[, offset]) — lookup: the key whose target row
# supplies unchanged values (None: the row's own).  values: a list, or (as the C fold
# keeps them) the pgoutput message itself with its TupleData at ``offset``: a row
# then costs no Python object per value.  A plain tuple: one is made per change.
Entry = tuple[Any, ...]
OP: Final = 0
VALUES: Final = 1
LOOKUP: Final = 2
OFFSET: Final = 3
# what the fold of the common changes needs per relid: (pending dict, key positions)
FoldSpec = tuple[dict[Any, Entry], tuple[int, ...]]


class TableApplier:
    """Pending changes and the current column layout of one synced table."""

    def __init__(
        self,
        state: duckfile.TableState,
        con: Any,
        source: connecting.Connection,
        commit_point: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        # DuckDB refuses to commit ALTER TABLE after DELETE/UPDATE in one transaction:
        # the stream commits (with a partial-transaction checkpoint) around every DDL
        self.commit_point = commit_point or (lambda: None)
        self.con = con
        self.source = source
        self.pending: dict[Any, Entry] = {}
        self.has_unchanged = False
        self.layout: pgoutput.Relation | None = None
        self.layout_checked = False
        self.key_pos: list[int] = []
        # the key is the replica identity's primary key or index, NOT NULL: the MERGE matches it
        # with plain equality (~8% less CPU than IS NOT DISTINCT FROM); REPLICA IDENTITY FULL may
        # key a table on every column, NULLs included
        self.key_not_null = False
        self._key: Callable[[list[pgoutput.Value]], Any] = operator.itemgetter(0)
        self.applied = 0

    @property
    def target(self) -> identifiers.TableName:
        return self.state.target

    # -- folding ---------------------------------------------------------------
    def on_relation(self, rel: pgoutput.Relation) -> None:
        if self.layout != rel:
            self.layout = rel
            self.layout_checked = False

    def fold_spec(self) -> FoldSpec | None:
        """What ``fold_changes`` needs to fold this table's changes, or None while its layout is unchecked."""
        if not self.layout_checked:
            return None
        return (self.pending, tuple(self.key_pos))

    def _ensure_layout(self) -> None:
        if self.layout_checked:
            return
        assert self.layout is not None
        cols = [(c.name, c.type_oid, c.typmod) for c in self.layout.columns]
        current = [(c.name, c.type_oid, c.typmod) for c in self.state.columns]
        identity = _identity_key(self.layout)
        rekey = identity is not None and set(identity) != set(self.state.key)
        if cols != current or rekey:
            self.commit_point()  # the batch so far is applied under the old layout and key
            if cols != current:
                self._evolve(self.layout)  # (renames of key columns included)
            if identity is not None and set(identity) != set(self.state.key):
                log.info("replica identity of %s is now (%s): rows are keyed on it", self.state.source,
                         ", ".join(identity))
                self.state.key = list(identity)
                duckfile.save_table_state(self.con, self.state)
            self.commit_point()
        names = [c.name for c in self.layout.columns]
        self.key_pos = [names.index(k) for k in self.state.key]
        self.key_not_null = identity is not None and set(identity) == set(self.state.key)
        # a single-column key is the value itself, a composite key a tuple
        self._key = operator.itemgetter(*self.key_pos)
        self.layout_checked = True

    def insert(self, new: list[pgoutput.Value]) -> None:
        self._ensure_layout()
        self.pending[self._key(new)] = (UPSERT, new, None)

    def update(
        self,
        new: list[pgoutput.Value],
        old: list[pgoutput.Value] | None,
        unchanged: bool | None = None,
        old_is_key_only: bool = True,
    ) -> None:
        """Fold an update; ``unchanged``: whether ``new`` holds UNCHANGED markers (computed if None);
        ``old_is_key_only``: ``old`` holds only the key (else the whole old row: REPLICA IDENTITY FULL)."""
        self._ensure_layout()
        if old is not None and not old_is_key_only and unchanged is not False and pgoutput.UNCHANGED in new:
            # FULL logs the whole old row, TOASTed values inlined: it has what the new row left out
            # (and a key of every column must not hold the marker)
            new = [o if v is pgoutput.UNCHANGED else v for v, o in zip(new, old, strict=False)]
            unchanged = None
        key = self._key(new)
        lookup = key
        if old is not None:
            old_key = self._key(old)
            if old_key != key:
                lookup = old_key
                prior = self.pending.get(old_key)
                self.pending[old_key] = (DELETE, None, None)
                if prior is not None and prior[OP] == UPSERT:
                    self.pending[key] = self._merge(new, prior, lookup)
                    return
        if unchanged is None:
            unchanged = pgoutput.UNCHANGED in new
        if unchanged:
            prior = self.pending.get(lookup)
            if prior is not None and prior[OP] == UPSERT:
                self.pending[key] = self._merge(new, prior, lookup)
                return
            self.has_unchanged = True
            self.pending[key] = (UPSERT, new, lookup)
        else:
            self.pending[key] = (UPSERT, new, None)

    def _merge(self, new: list[pgoutput.Value], prior: Entry, lookup: Any) -> Entry:
        before = entry_values(prior)
        assert before is not None
        merged = [p if v is pgoutput.UNCHANGED else v for v, p in zip(new, before, strict=False)]
        if pgoutput.UNCHANGED in merged:
            self.has_unchanged = True
            return (UPSERT, merged, prior[LOOKUP] or lookup)
        return (UPSERT, merged, None)

    def delete(self, old: list[pgoutput.Value]) -> None:
        self._ensure_layout()
        self.pending[self._key(old)] = (DELETE, None, None)

    def truncate(self) -> None:
        self.pending.clear()
        self.has_unchanged = False
        self.con.execute(f"DELETE FROM {self.target.sql}")

    # -- applying --------------------------------------------------------------
    def flush(self) -> int:
        """Apply pending changes (inside the caller's transaction); the pending dict is emptied in place."""
        n = self.apply(self.pending, self.has_unchanged)
        self.pending.clear()
        self.has_unchanged = False
        return n

    def detach(self) -> tuple[dict[Any, Entry], bool]:
        """The pending changes, for :meth:`apply` elsewhere; folding goes on into a new dict
        (whoever holds a :meth:`fold_spec` must ask again)."""
        detached = self.pending, self.has_unchanged
        self.pending, self.has_unchanged = {}, False
        return detached

    def apply(self, pending: dict[Any, Entry], has_unchanged: bool) -> int:
        """Apply ``pending`` (inside the caller's transaction)."""
        if not pending:
            return 0
        cols = self.state.columns
        ncols, nkey = len(cols), len(self.state.key)
        keys = list(pending.keys())
        entries = list(pending.values())

        def split(ks: list[Any]) -> list[Any]:
            return [ks] if nkey == 1 else [list(c) for c in zip(*ks, strict=True)]

        deleted = [e[OP] == DELETE for e in entries]
        arrays: dict[str, pa.Array] = {"del": pa.array(deleted, pa.bool_())}
        unchanged_cols: list[int] = []
        if pgoutput.SPEEDUPS and not has_unchanged:  # the usual case, in C
            for j, arr in enumerate(_text_arrays(keys, 0 if nkey == 1 else nkey)):
                arrays[f"k{j}"] = arr
            for i, arr in enumerate(_staged_arrays(entries, ncols)):
                if cols[i].duck_type == "JSON" and cols[i].pg_base == "jsonb":
                    # PostgreSQL only sends valid jsonb: no need for DuckDB to parse it again
                    arr = pa.ExtensionArray.from_storage(_JSON, arr)
                arrays[f"v{i}"] = arr
        else:
            key_cols = split(keys)
            nulls = [None] * ncols
            rows = [entry_values(e) or nulls for e in entries]
            val_cols: list[Any] = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(ncols)]
            arrays.update({f"k{j}": pa.array(key_cols[j], pa.string()) for j in range(nkey)})
            if has_unchanged:
                for i in range(ncols):
                    flags = [v is pgoutput.UNCHANGED for v in val_cols[i]]
                    if any(flags):
                        unchanged_cols.append(i)
                        arrays[f"u{i}"] = pa.array(flags, pa.bool_())
                        val_cols[i] = [None if f else v for v, f in zip(val_cols[i], flags, strict=True)]
                lookups = split([e[LOOKUP] if e[LOOKUP] is not None else k for k, e in zip(keys, entries, strict=True)])
                for j in range(nkey):
                    arrays[f"l{j}"] = pa.array(lookups[j], pa.string())
            for i in range(ncols):
                arrays[f"v{i}"] = pa.array(val_cols[i], pa.string())
        stage = pa.table(arrays)
        key_cols_meta = [self._column(k) for k in self.state.key]
        t = self.target.sql
        names = ", ".join(quote(c.name) for c in cols)
        # the fast path reads the stage once: as a bare Arrow C stream (no pyarrow.dataset import in DuckDB)
        self.con.register("_ds_stage", stage if unchanged_cols else duckfile.arrow_stream(stage))
        try:
            if unchanged_cols:
                exprs = []
                for i, c in enumerate(cols):
                    cast = _mapping(c).cast(f"_dss.v{i}")
                    if i in unchanged_cols:
                        exprs.append(f"CASE WHEN _dss.u{i} THEN _dst.{quote(c.name)} ELSE {cast} END")
                    else:
                        exprs.append(cast)
                on = " AND ".join(
                    f"_dst.{quote(kc.name)} = {_mapping(kc).cast(f'_dss.l{j}')}" for j, kc in enumerate(key_cols_meta)
                )
                self.con.execute(
                    f"CREATE OR REPLACE TEMP TABLE _ds_new AS SELECT {', '.join(exprs)} "
                    f"FROM _ds_stage _dss LEFT JOIN {t} _dst ON {on} WHERE NOT _dss.del"
                )
            keysel = ", ".join(f"{_mapping(kc).cast(f'k{j}')} AS k{j}" for j, kc in enumerate(key_cols_meta))
            eq = "=" if self.key_not_null else "IS NOT DISTINCT FROM"
            match = " AND ".join(f"{t}.{quote(kc.name)} {eq} _dss.k{j}" for j, kc in enumerate(key_cols_meta))
            if unchanged_cols:
                self.con.execute(f"DELETE FROM {t} USING (SELECT {keysel} FROM _ds_stage) _dss WHERE {match}")
                self.con.execute(f"INSERT INTO {t} ({names}) SELECT * FROM _ds_new")
                self.con.execute("DROP TABLE _ds_new")
            else:
                # rows that stay are updated in place: delete + insert would leave DuckDB's
                # checkpoint to vacuum every touched row group (measured: 25% slower, 6x the WAL).
                # One MERGE joins the stage with the table once (three statements: 25% slower).
                key_names = set(self.state.key)
                vals = ", ".join(f"{_mapping(c).cast(f'v{i}')} AS v{i}" for i, c in enumerate(cols))
                clauses = ["WHEN MATCHED AND _dss.del THEN DELETE"]
                sets = [f"{quote(c.name)} = _dss.v{i}" for i, c in enumerate(cols) if c.name not in key_names]
                if sets:
                    clauses.append(f"WHEN MATCHED THEN UPDATE SET {', '.join(sets)}")
                clauses.append(
                    f"WHEN NOT MATCHED AND NOT _dss.del THEN INSERT ({names}) "
                    f"VALUES ({', '.join(f'_dss.v{i}' for i in range(ncols))})"
                )
                self.con.execute(
                    f"MERGE INTO {t} USING (SELECT {keysel}, del, {vals} FROM _ds_stage) _dss ON {match} "
                    + " ".join(clauses)
                )
        except duckdb.ConversionException as exc:
            # the batch's transaction is rolled back and resent after a fix: nothing is lost
            raise errors.value_out_of_range(
                str(self.state.source),
                f"a changed value does not fit its DuckDB type: {str(exc).splitlines()[0]}",
                "the stream stops before this transaction (nothing is lost or skipped) and retries it on every restart",
            ) from None
        finally:
            self.con.unregister("_ds_stage")
        n = len(entries)
        self.applied += n
        return n

    def _column(self, name: str) -> duckfile.TargetColumn:
        for c in self.state.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    # -- schema evolution ------------------------------------------------------
    def _evolve(self, rel: pgoutput.Relation) -> None:
        t = self.target.sql
        alive_rows = self.source.execute(
            "SELECT attnum FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (self.state.source.sql,),
        ).fetchall()
        alive = {int(r[0]) for r in alive_rows}
        pairs, dropped = match_columns(self.state.columns, list(rel.columns), alive.__contains__)
        resolver = catalog.TypeResolver(self.source)
        next_attnum = max([c.attnum for c in self.state.columns] + [self.state.max_attnum])
        result: list[duckfile.TargetColumn] = []
        backfill: list[str] = []
        for old in dropped:
            log.info("schema change on %s: drop column %s", self.state.source, old.name)
            self.con.execute(f"ALTER TABLE {t} DROP COLUMN {quote(old.name)}")
        for prev, rc in pairs:
            mapping = resolver.resolve(rc.type_oid, rc.typmod)
            if prev is None:
                next_attnum += 1
                attnum = next_attnum
            else:
                attnum = prev.attnum
            col = duckfile.TargetColumn(rc.name, rc.type_oid, rc.typmod, mapping.duck_type, mapping.pg_base, attnum)
            if prev is None:
                log.info("schema change on %s: add column %s %s", self.state.source, col.name, col.duck_type)
                self.con.execute(f"ALTER TABLE {t} ADD COLUMN {quote(col.name)} {col.duck_type}")
                backfill.append(col.name)
            else:
                if prev.name != rc.name:
                    log.info("schema change on %s: rename column %s to %s", self.state.source, prev.name, rc.name)
                    self.con.execute(f"ALTER TABLE {t} RENAME COLUMN {quote(prev.name)} TO {quote(rc.name)}")
                if (prev.type_oid, prev.typmod) != (rc.type_oid, rc.typmod):
                    log.info("schema change on %s: column %s is now %s", self.state.source, col.name, col.duck_type)
                    self.con.execute(
                        f"ALTER TABLE {t} ALTER COLUMN {quote(col.name)} SET DATA TYPE {col.duck_type} "
                        f"USING CAST(NULL AS {col.duck_type})"
                    )
                    backfill.append(col.name)
            result.append(col)
        self.state.columns = result
        self.state.max_attnum = next_attnum
        # the key follows its columns' renames; a dropped column leaves it (FULL keys on all columns)
        renamed = {prev.name: rc.name for prev, rc in pairs if prev is not None}
        # (a table that lost its whole key is keyed on every column, as under FULL)
        self.state.key = [renamed[k] for k in self.state.key if k in renamed] or [c.name for c in result]
        if backfill:
            self._backfill([c for c in result if c.name in backfill])
        duckfile.save_table_state(self.con, self.state)

    def _backfill(self, columns: list[duckfile.TargetColumn]) -> None:
        """Copy the current source values of ``columns`` into the target rows.

        Columns are found by attnum, their identity: a column renamed later in
        the stream is read under its current name.
        """
        from datasync.engine import snapshotting

        current = dict(
            self.source.execute(
                "SELECT attnum, attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped",
                (self.state.source.sql,),
            ).fetchall()
        )
        columns = [c for c in columns if c.attnum in current]
        keys = [self._column(k) for k in self.state.key]
        if not columns or any(k.attnum not in current for k in keys):
            return  # gone again at the source; later Relation messages follow
        sel = ", ".join(quote(current[c.attnum]) for c in keys + columns)
        buf = connecting.copy_out(self.source, f"COPY (SELECT {sel} FROM {self.state.source.sql}) TO STDOUT (FORMAT csv)")
        if not buf:
            return
        data = snapshotting.read_csv(buf, len(keys) + len(columns))
        nk = len(keys)
        sets = ", ".join(
            f"{quote(c.name)} = {_mapping(c).cast(f'_dss.c{nk + i}')}" for i, c in enumerate(columns)
        )
        on = " AND ".join(
            f"{self.target.sql}.{quote(k.name)} = {_mapping(k).cast(f'_dss.c{j}')}" for j, k in enumerate(keys)
        )
        self.con.register("_ds_backfill", data)
        try:
            self.con.execute(f"UPDATE {self.target.sql} SET {sets} FROM _ds_backfill _dss WHERE {on}")
        finally:
            self.con.unregister("_ds_backfill")


def _mapping(col: duckfile.TargetColumn) -> typemaps.Mapping:
    return typemaps.Mapping(col.duck_type, col.pg_base)


def _identity_key(rel: pgoutput.Relation) -> list[str] | None:
    """The columns a delete or key change identifies a row by under ``rel``'s replica identity.

    None when the key need not follow the identity: FULL sends the whole old row (any
    key the copy has works), and DEFAULT without a primary key or NOTHING sends no old
    key at all (PostgreSQL refuses such updates and deletes at the source).
    """
    if rel.replica_identity not in ("d", "i"):
        return None
    return [c.name for c in rel.columns if c.is_key] or None


def match_columns(
    old: list[duckfile.TargetColumn],
    layout: list[pgoutput.RelationColumn],
    alive: Callable[[int], bool],
) -> tuple[list[tuple[duckfile.TargetColumn | None, pgoutput.RelationColumn]], list[duckfile.TargetColumn]]:
    """Match a new Relation layout to the target's columns.

    Returns (pairs in layout order: (old column or None for an added one, new
    column), dropped old columns).  A Relation message lists columns in attnum
    order and PostgreSQL appends added columns at the end, so a new name placed
    before a surviving column is a rename of a missing column in that gap; new
    names at the tail are renames only while the source still has the missing
    column's attnum (``alive``), otherwise additions.
    """
    by_name = {c.name: c for c in old}
    ordered = sorted(old, key=lambda c: c.attnum)
    layout_names = {c.name for c in layout}
    missing = [c for c in ordered if c.name not in layout_names]
    pairs: list[tuple[duckfile.TargetColumn | None, pgoutput.RelationColumn]] = []
    used: set[str] = set()
    last_attnum = 0
    for i, rc in enumerate(layout):
        match = by_name.get(rc.name)
        if match is not None:
            pairs.append((match, rc))
            used.add(match.name)
            last_attnum = match.attnum
            continue
        later = [by_name[c.name].attnum for c in layout[i + 1 :] if c.name in by_name]
        bound = min(later) if later else None
        gap = [
            c for c in missing
            if c.name not in used and c.attnum > last_attnum and (bound is None or c.attnum < bound)
        ]
        living = [c for c in gap if alive(c.attnum)]
        if bound is None or living:
            gap = living  # at the tail a dead attnum means an addition; in a gap prefer live ones
        if gap:
            pairs.append((gap[0], rc))
            used.add(gap[0].name)
            last_attnum = gap[0].attnum
        else:
            pairs.append((None, rc))
    dropped = [c for c in old if c.name not in used]
    return pairs, dropped


def _py_fold_changes(msgs: list[bytes], start: int, tables: dict[int, FoldSpec], limit: int) -> tuple[int, int]:
    """Fold the common changes of ``msgs[start:]`` into pending dicts; returns (next index, changes folded).

    ``tables``: relid -> (pending dict, key positions).  Stops before the first
    message it leaves to :class:`TableApplier` (another message type, another
    relid, an unchanged-TOAST marker, a key change) and after a change that
    brings a pending dict to ``limit`` entries.  The same fold as
    ``TableApplier.insert/update/delete`` for those cases, except that a row
    that stays is kept as its message (see ``Entry``); ``_speedups.fold_changes``
    (C, one call per run of changes instead of several per change) replaces it
    when built.
    """
    i, folded = start, 0
    while i < len(msgs):
        data = msgs[i]
        tag = data[0] if len(data) >= 6 else 0
        if tag not in (0x49, 0x55, 0x44):
            break
        spec = tables.get(int.from_bytes(data[1:5], "big"))
        if spec is None:
            break
        pending, pos = spec
        key_of = operator.itemgetter(*pos)  # as TableApplier keys rows: a value, or a tuple of them
        at, marker = 6, data[5]
        old: list[pgoutput.Value] | None = None
        if tag != 0x49 and marker in (0x4B, 0x4F):  # 'K', 'O'
            old, at = pgoutput.read_tuple(data, at)
            if pgoutput.UNCHANGED in old:
                break
            if tag == 0x55:
                if at >= len(data):
                    raise pgoutput.DecodeError("update without new tuple")
                marker, at = data[at], at + 1
        if tag == 0x44:
            if old is None:
                raise pgoutput.DecodeError("delete without old tuple")
            pending[key_of(old)] = (DELETE, None, None)
        else:
            if marker != 0x4E:  # 'N'
                raise pgoutput.DecodeError("insert without new tuple" if tag == 0x49 else "update without new tuple")
            new, _ = pgoutput.read_tuple(data, at)
            key = key_of(new)
            if pgoutput.UNCHANGED in new or (old is not None and key_of(old) != key):
                break
            pending[key] = (UPSERT, data, None, at)
        folded += 1
        i += 1
        if len(pending) >= limit:
            break
    return i, folded


if pgoutput.SPEEDUPS:
    from datasync.engine import _speedups  # type: ignore[attr-defined]

    fold_changes: Callable[[list[bytes], int, dict[int, FoldSpec], int], tuple[int, int]] = _speedups.fold_changes
else:  # pragma: no cover - exercised where no C compiler was available
    fold_changes = _py_fold_changes


def entry_values(entry: Entry) -> list[pgoutput.Value] | None:
    """The row of a folded change as a list (decoded if the fold kept the message)."""
    values = entry[VALUES]
    if isinstance(values, bytes):
        return pgoutput.read_tuple(values, entry[OFFSET])[0]
    return values  # type: ignore[no-any-return]


def _strings(columns: list[tuple[Any, Any, Any]], n: int) -> list[pa.Array]:
    """Arrow large_string arrays over the (validity, offsets, data) buffers the C stagers made."""
    return [
        pa.Array.from_buffers(pa.large_string(), n, [pa.py_buffer(valid), pa.py_buffer(offsets), pa.py_buffer(data)])
        for valid, offsets, data in columns
    ]


def _staged_arrays(entries: list[Entry], ncols: int) -> list[pa.Array]:
    """The folded rows' values as Arrow string columns (messages are read without Python objects)."""
    return _strings(_speedups.stage_values(entries, ncols), len(entries))


def _text_arrays(rows: list[Any], ncols: int) -> list[pa.Array]:
    """Arrow string columns of ``rows`` (lists of text/None, or None: all null); ``ncols`` 0: one value per row."""
    return _strings(_speedups.text_columns(rows, ncols), len(rows))
