"""What the source catalog says about a table: columns, key, partitions, size.

The key used to identify rows is the primary key, else the replica identity
index, else (REPLICA IDENTITY FULL) all columns.  A table with none of these
cannot have its updates and deletes replicated and is refused up front.
"""

from __future__ import annotations

import dataclasses

from datasync import errors, identifiers
from datasync.sources import connecting, typemaps


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    typmod: int
    pg_type: str
    mapping: typemaps.Mapping
    attnum: int

    @property
    def duck_type(self) -> str:
        return self.mapping.duck_type


@dataclasses.dataclass(frozen=True)
class Table:
    name: identifiers.TableName
    oid: int
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    replica_identity: str
    leaves: tuple[identifiers.TableName, ...]  # heap relations to read (itself or leaf partitions)
    est_rows: int
    max_attnum: int  # pg_class.relnatts: attnums ever used, dropped columns included

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


_TYPE_SQL = """
WITH RECURSIVE chain(oid, typmod, depth) AS (
    SELECT %(oid)s::oid, %(typmod)s::int, 0
  UNION ALL
    SELECT t.typbasetype, CASE WHEN t.typtypmod >= 0 THEN t.typtypmod ELSE c.typmod END, c.depth + 1
    FROM chain c JOIN pg_type t ON t.oid = c.oid
    WHERE t.typtype = 'd'
)
SELECT t.typname, c.typmod, t.typcategory
FROM chain c JOIN pg_type t ON t.oid = c.oid
ORDER BY c.depth DESC LIMIT 1
"""


class TypeResolver:
    """Resolves (type oid, typmod) to a mapping, following domains; cached."""

    def __init__(self, conn: connecting.Connection) -> None:
        self.conn = conn
        self._cache: dict[tuple[int, int], typemaps.Mapping] = {}

    def resolve(self, oid: int, typmod: int) -> typemaps.Mapping:
        key = (oid, typmod)
        if key not in self._cache:
            row = self.conn.execute(_TYPE_SQL, {"oid": oid, "typmod": typmod}).fetchone()
            if row is None:
                self._cache[key] = typemaps.Mapping("VARCHAR", "unknown")
            else:
                self._cache[key] = typemaps.map_type(row[0], row[1], row[2])
        return self._cache[key]


def describe(conn: connecting.Connection, name: identifiers.TableName) -> Table:
    """Describe ``name`` or raise a SourceError that says what is wrong."""
    row = conn.execute(
        """SELECT c.oid, c.relkind, c.relreplident, greatest(c.reltuples, 0)::bigint, c.relnatts
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s""",
        (name.schema, name.name),
    ).fetchone()
    if row is None:
        raise errors.SourceError(
            f"source table {name} does not exist",
            "check the schema and table name; names with capitals or spaces must be quoted "
            "SQL-style, e.g. --table '\"Sales Dept\".\"Order Items\"'",
        )
    oid, relkind, replident, est_rows, relnatts = row
    if relkind not in ("r", "p"):
        raise errors.SourceError(
            f"{name} is not a table (relkind {relkind!r})", "only ordinary and partitioned tables can be synced"
        )
    resolver = TypeResolver(conn)
    cols = conn.execute(
        """SELECT attname, atttypid, atttypmod, format_type(atttypid, atttypmod), attnum
           FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
           ORDER BY attnum""",
        (oid,),
    ).fetchall()
    columns = tuple(Column(n, t, m, f, resolver.resolve(t, m), a) for n, t, m, f, a in cols)
    pk = _index_columns(conn, oid, "indisprimary")
    ri = _index_columns(conn, oid, "indisreplident")
    # the key is what PostgreSQL identifies a row by in deletes and key changes: the replica
    # identity index when there is one (its old-key tuple holds only those columns, even
    # beside a primary key), else the primary key, else (FULL) every column
    if replident == "i" and ri:
        key = ri
    elif pk:
        key = pk
    elif replident == "f":
        key = tuple(c.name for c in columns)
    else:
        raise errors.SourceError(
            f"table {name} has no primary key and no REPLICA IDENTITY FULL, so its updates and "
            "deletes cannot be identified",
            f"add a primary key, or run: ALTER TABLE {name.sql} REPLICA IDENTITY FULL",
        )
    if replident == "n":
        raise errors.SourceError(
            f"table {name} has REPLICA IDENTITY NOTHING: its updates and deletes are not replicated",
            f"run: ALTER TABLE {name.sql} REPLICA IDENTITY DEFAULT",
        )
    if relkind == "p":
        leaves = tuple(
            identifiers.TableName(s, t)
            for s, t in conn.execute(
                """SELECT n.nspname, c.relname FROM pg_partition_tree(%s) p
                   JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE p.isleaf ORDER BY 1, 2""",
                (oid,),
            ).fetchall()
        )
        est = conn.execute(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_partition_tree(%s) p "
            "JOIN pg_class c ON c.oid = p.relid WHERE p.isleaf",
            (oid,),
        ).fetchone()
        est_rows = int(est[0]) if est else 0
    else:
        leaves = (name,)
    return Table(name, oid, columns, key, replident, leaves, int(est_rows), int(relnatts))


def _index_columns(conn: connecting.Connection, oid: int, flag: str) -> tuple[str, ...]:
    assert flag in ("indisprimary", "indisreplident")
    rows = conn.execute(
        f"""SELECT a.attname FROM pg_index i
            JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = %s AND i.{flag} ORDER BY k.ord""",
        (oid,),
    ).fetchall()
    return tuple(r[0] for r in rows)
