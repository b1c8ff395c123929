"""Referential integrity of the copy: the source's foreign keys, checked in DuckDB.

DuckDB tables carry no foreign keys (the engine copies data, not constraints), so nothing
stops a lost parent row or a stray child row in the copy.  The source enforces its foreign
keys at every commit; a copy aligned with it at one LSN must satisfy them too.  Foreign keys
are read from ``pg_constraint`` for the checked tables (plus any declared ones the catalog
lacks, e.g. between tables of different applications) whose referenced table is synced into
the same target; a child row with every referencing column set (MATCH SIMPLE: one NULL
exempts the row, as in PostgreSQL) and no parent row is an *orphan*.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import duckdb
import psycopg

from datasync import errors, identifiers
from datasync.identifiers import quote
from datasync.targets import duckfile

SAMPLE = 100


@dataclasses.dataclass(frozen=True)
class ForeignKey:
    name: str
    child: identifiers.TableName
    columns: tuple[str, ...]
    parent: identifiers.TableName
    parent_columns: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}: {self.child}({', '.join(self.columns)}) → {self.parent}({', '.join(self.parent_columns)})"


@dataclasses.dataclass
class Violations:
    key: ForeignKey
    orphans: int
    sample: list[Any]  # key values of orphan rows (the child's primary key)


_DECLARED = re.compile(
    r"^\s*(?:(?P<name>[^:]+):)?\s*(?P<child>.+?)\s*\((?P<cols>[^)]*)\)"
    r"\s*->\s*(?P<parent>.+?)\s*\((?P<pcols>[^)]*)\)\s*$"
)


def parse(text: str) -> ForeignKey:
    """``[NAME:] schema.child(col, ...) -> schema.parent(col, ...)``: a foreign key the catalog lacks."""
    m = _DECLARED.match(text)
    if m is None:
        raise errors.DataSyncError(
            f"cannot read foreign key {text!r}", "write [NAME:] SCHEMA.CHILD(COL, ...) -> SCHEMA.PARENT(COL, ...)"
        )
    cols = tuple(c.strip() for c in m["cols"].split(",") if c.strip())
    pcols = tuple(c.strip() for c in m["pcols"].split(",") if c.strip())
    if not cols or len(cols) != len(pcols):
        raise errors.DataSyncError(f"foreign key {text!r} needs as many columns as it references", "list both sides")
    child, parent = identifiers.TableName.parse(m["child"]), identifiers.TableName.parse(m["parent"])
    name = (m["name"] or f"{child.name}_{'_'.join(cols)}_fkey").strip()
    return ForeignKey(name, child, cols, parent, pcols)


def foreign_keys(pg: psycopg.Connection[Any], child: identifiers.TableName) -> list[ForeignKey]:
    """The foreign keys declared on ``child`` in the source catalog."""
    rows = pg.execute(
        """SELECT con.conname, pn.nspname, pc.relname,
                  ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i),
                  ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
                        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i)
           FROM pg_constraint con
           JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
           JOIN pg_class pc ON pc.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
           WHERE con.contype = 'f' AND cn.nspname = %s AND cc.relname = %s AND con.conparentid = 0
           ORDER BY con.conname""",
        (child.schema, child.name),
    ).fetchall()
    return [
        ForeignKey(str(n), child, tuple(cols), identifiers.TableName(str(s), str(t)), tuple(pcols))
        for n, s, t, cols, pcols in rows
    ]


def check(duck: duckdb.DuckDBPyConnection, key: ForeignKey, states: dict[identifiers.TableName, duckfile.TableState],
          ) -> Violations:
    """Orphan rows of ``key`` in the copy (both tables must be synced into it)."""
    child, parent = states[key.child], states[key.parent]
    join = " AND ".join(f"p.{quote(pc)} = c.{quote(cc)}" for cc, pc in zip(key.columns, key.parent_columns, strict=True))
    set_ = " AND ".join(f"c.{quote(cc)} IS NOT NULL" for cc in key.columns)
    shown = child.key or list(key.columns)
    where = f"{set_} AND NOT EXISTS (SELECT 1 FROM {parent.target.sql} p WHERE {join})"
    row = duck.execute(f"SELECT count(*) FROM {child.target.sql} c WHERE {where}").fetchone()
    orphans = int(row[0]) if row else 0
    sample: list[Any] = []
    if orphans:
        cols = ", ".join(f"CAST(c.{quote(k)} AS VARCHAR)" for k in shown)
        order = ", ".join(f"c.{quote(k)}" for k in shown)
        for r in duck.execute(f"SELECT {cols} FROM {child.target.sql} c WHERE {where} ORDER BY {order} LIMIT {SAMPLE}"
                              ).fetchall():
            sample.append(r[0] if len(r) == 1 else list(r))
    return Violations(key, orphans, sample)
