"""Test helpers: run the CLI or the engine, compare target and source value by value."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import math
import os
import subprocess
import sys
import uuid
from typing import Any

import duckdb
import psycopg

from datasync import identifiers
from datasync.engine import syncing
from datasync.sources.embedded import EmbeddedPostgres

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Source:
    server: EmbeddedPostgres
    dbname: str

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.dbname)

    def execute(self, sql: str, params: Any = None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql, params)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def slots(self) -> list[str]:
        return [r[0] for r in self.query("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")]

    def publications(self) -> list[str]:
        return [r[0] for r in self.query("SELECT pubname FROM pg_publication")]


def sync_once(src: Source, target: str, *tables: str, **kw: Any) -> syncing.Result:
    opts = syncing.Options(source=src.dsn, target=target, tables=list(tables), memory_limit="512MB", **kw)
    return syncing.run(opts)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datasync", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT,
    )


def _norm(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return v.astimezone(dt.UTC).isoformat()
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, decimal.Decimal):
        return v.normalize() if v.is_finite() else str(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    return v


_PG_CANON = {
    "INTERVAL": "((extract(year from {c})*12 + extract(month from {c}))::bigint || '/' || extract(day from {c})::bigint"
    " || '/' || (extract(hour from {c})*3600000000 + extract(minute from {c})*60000000"
    " + extract(microseconds from {c}))::bigint)",
    "EPOCH": "CASE WHEN isfinite({c}) THEN (extract(epoch from {c})*1000000)::bigint::text ELSE {c}::text END",
}
_DUCK_CANON = {
    "INTERVAL": "((datepart('year', {c})::BIGINT*12 + datepart('month', {c}))::VARCHAR || '/' || datepart('day', {c})"
    " || '/' || (datepart('hour', {c})::BIGINT*3600000000 + datepart('minute', {c})::BIGINT*60000000"
    " + datepart('microseconds', {c})))",
    "EPOCH": "CASE WHEN isfinite({c}) THEN CAST(epoch_us(CAST({c} AS TIMESTAMP)) AS VARCHAR) ELSE CAST({c} AS VARCHAR) END",
}


def _canon(duck_type: str) -> str | None:
    if duck_type == "INTERVAL":
        return "INTERVAL"
    if duck_type in ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE"):
        return "EPOCH"
    return None


def fetch_pg(src: Source, table: str, duck_types: dict[str, str]) -> list[tuple[Any, ...]]:
    """Source rows, sorted; columns mapped to VARCHAR/JSON in DuckDB are read as text."""
    name = identifiers.TableName.parse(table)
    parts = []
    for c, t in duck_types.items():
        q = identifiers.quote(c)
        canon = _canon(t)
        if canon:
            parts.append(_PG_CANON[canon].format(c=q))
        elif t in ("VARCHAR", "JSON"):  # the type's output function, as COPY/pgoutput render it
            parts.append(f"CASE WHEN {q} IS NULL THEN NULL ELSE format('%s', {q}) END")
        elif t == "FLOAT":
            parts.append(f"{q}::float8")
        else:
            parts.append(q)
    rows = src.query(f"SELECT {', '.join(parts)} FROM {name.sql}")
    return sorted((tuple(_norm(v) for v in r) for r in rows), key=repr)


def fetch_duck(path: str, table: str) -> tuple[dict[str, str], list[tuple[Any, ...]]]:
    name = identifiers.TableName.parse(table)
    con = duckdb.connect(path, read_only=True)
    try:
        types = {
            r[0]: r[1]
            for r in con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                [name.schema, name.name],
            ).fetchall()
        }
        if not types:
            return types, []
        parts = []
        for c, t in types.items():
            canon = _canon(t)
            q = identifiers.quote(c)
            parts.append(_DUCK_CANON[canon].format(c=q) if canon else q)
        rows = con.execute(f"SELECT {', '.join(parts)} FROM {name.sql}").fetchall()
    finally:
        con.close()
    return types, sorted((tuple(_norm(v) for v in r) for r in rows), key=repr)


def assert_same(src: Source, path: str, table: str) -> int:
    """Target table equals the source table, row by row and value by value."""
    types, duck_rows = fetch_duck(path, table)
    assert types, f"{table} missing in target"
    pg_rows = fetch_pg(src, table, types)
    pg_cols = [r[0] for r in src.query(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", (identifiers.TableName.parse(table).sql,))]
    assert list(types) == pg_cols, f"columns differ: target {list(types)} source {pg_cols}"
    if pg_rows != duck_rows:
        missing = set(pg_rows) - set(duck_rows)
        extra = set(duck_rows) - set(pg_rows)
        by_first = {r[0]: r for r in extra}
        diffs = []
        for r in sorted(missing, key=repr)[:5]:
            other = by_first.get(r[0])
            if other is not None:
                cols = list(types)
                diffs.append({cols[i]: (a, b) for i, (a, b) in enumerate(zip(r, other, strict=False)) if a != b})
        raise AssertionError(
            f"{table}: {len(pg_rows)} source rows, {len(duck_rows)} target rows; column diffs {diffs}; "
            f"missing {sorted(missing, key=repr)[:5]} extra {sorted(extra, key=repr)[:5]}"
        )
    return len(pg_rows)


def md5_uuid(n: int) -> str:
    """PostgreSQL's md5(n::text)::uuid, as text."""
    import hashlib

    h = hashlib.md5(str(n).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
