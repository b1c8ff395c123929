"""The same bytes for the same value, on both sides.

A row is rendered as text column by column, each value by an expression that
yields identical text in PostgreSQL and in DuckDB for every type the engine
maps (``sources.typemaps``): instants and dates as epoch microseconds,
intervals as months/days/µs, bytes as hex, floats through their bit-exact
shortest text, everything stored as text verbatim.  A NULL is not an empty
string: every value is length-prefixed and NULL has its own marker.  The row's
hash is the first 60 bits of md5 over that text — on both sides, so a row hash
computed in PostgreSQL equals the one computed in DuckDB exactly when the rows
are equal.
"""

from __future__ import annotations

from datasync.identifiers import quote
from datasync.targets import duckfile

_PG: dict[str, str] = {
    "INTERVAL": "((extract(year from {c})*12 + extract(month from {c}))::bigint || '/' || extract(day from {c})::bigint"
    " || '/' || (extract(hour from {c})*3600000000 + extract(minute from {c})*60000000"
    " + extract(microseconds from {c}))::bigint)",
    "EPOCH": "(CASE WHEN isfinite({c}) THEN (extract(epoch from {c})*1000000)::bigint::text ELSE {c}::text END)",
    "TIME": "((extract(epoch from {c})*1000000)::bigint::text)",
    "TIMETZ": "((extract(epoch from {c}::time)*1000000)::bigint::text || extract(timezone from {c})::int::text)",
    "BLOB": "encode({c}, 'hex')",
    "FLOAT": "{c}::float8::text",
    "DECIMAL": "(CASE WHEN {c} = 'NaN' THEN NULL ELSE {c}::text END)",
    "TEXT": "{c}::text",
    # types whose cast to text is not their output form (char(n) drops its padding, inet shows /32)
    "OUTPUT": "(CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END)",
    "PLAIN": "{c}::text",
}
_DUCK: dict[str, str] = {
    "INTERVAL": "((datepart('year', {c})::BIGINT*12 + datepart('month', {c}))::VARCHAR || '/' || datepart('day', {c})"
    " || '/' || (datepart('hour', {c})::BIGINT*3600000000 + datepart('minute', {c})::BIGINT*60000000"
    " + datepart('microseconds', {c})))",
    "EPOCH": "(CASE WHEN isfinite({c}) THEN CAST(epoch_us(CAST({c} AS TIMESTAMP)) AS VARCHAR)"
    " ELSE CAST({c} AS VARCHAR) END)",
    "TIME": "CAST(epoch_us({c}) AS VARCHAR)",
    "TIMETZ": "(CAST(epoch_us(CAST({c} AS TIME)) AS VARCHAR) || CAST(date_part('timezone', {c}) AS VARCHAR))",
    "BLOB": "lower(hex({c}))",
    # PostgreSQL's float8out: shortest round-trip digits, exponent form outside [1e-4, 1e15);
    # DuckDB prints the same digits, but '.0' on integral values and fixed form up to 1e16
    "FLOAT": "(CASE WHEN isnan(CAST({c} AS DOUBLE)) THEN 'NaN' WHEN CAST({c} AS DOUBLE) = 'inf'::DOUBLE THEN 'Infinity'"
    " WHEN CAST({c} AS DOUBLE) = '-inf'::DOUBLE THEN '-Infinity'"
    " WHEN abs(CAST({c} AS DOUBLE)) >= 1e15 AND abs(CAST({c} AS DOUBLE)) < 1e16 THEN"
    " (CASE WHEN CAST({c} AS DOUBLE) < 0 THEN '-' ELSE '' END)"
    " || left(rtrim(replace(CAST(abs(CAST({c} AS DOUBLE)) AS VARCHAR), '.', ''), '0'), 1)"
    " || (CASE WHEN length(rtrim(replace(CAST(abs(CAST({c} AS DOUBLE)) AS VARCHAR), '.', ''), '0')) > 1"
    " THEN '.' || substr(rtrim(replace(CAST(abs(CAST({c} AS DOUBLE)) AS VARCHAR), '.', ''), '0'), 2) ELSE '' END)"
    " || 'e+15'"
    " ELSE regexp_replace(CAST(CAST({c} AS DOUBLE) AS VARCHAR), '\\.0$', '') END)",
    "DECIMAL": "CAST({c} AS VARCHAR)",
    "TEXT": "CAST({c} AS VARCHAR)",
    "OUTPUT": "CAST({c} AS VARCHAR)",
    "PLAIN": "CAST({c} AS VARCHAR)",
}

_OUTPUT_BASES = ("bpchar", "inet", "cidr")


def kind_of(col: duckfile.TargetColumn) -> str:
    k = kind(col.duck_type)
    return "OUTPUT" if k == "TEXT" and col.pg_base in _OUTPUT_BASES else k


def kind(duck_type: str) -> str:
    if duck_type == "INTERVAL":
        return "INTERVAL"
    if duck_type in ("DATE", "TIMESTAMP", "TIMESTAMPTZ"):
        return "EPOCH"
    if duck_type in ("TIME", "TIMETZ", "BLOB"):
        return duck_type
    if duck_type in ("FLOAT", "DOUBLE"):
        return "FLOAT"
    if duck_type.startswith("DECIMAL"):
        return "DECIMAL"
    if duck_type in ("VARCHAR", "JSON"):
        return "TEXT"
    return "PLAIN"


def _render(exprs: list[str], length: str) -> str:
    # byte-length-prefixed values, NULL as '~': no two different rows render alike
    parts = [f"coalesce({length}({e})::VARCHAR || ':' || {e}, '~')" for e in exprs]
    return " || '|' || ".join(parts) if parts else "''"


def pg_value(col: duckfile.TargetColumn) -> str:
    return _PG[kind_of(col)].format(c=quote(col.name))


def duck_value(col: duckfile.TargetColumn) -> str:
    return _DUCK[kind_of(col)].format(c=quote(col.name))


def pg_row(columns: list[duckfile.TargetColumn]) -> str:
    return _render([pg_value(c) for c in columns], "octet_length").replace("::VARCHAR", "::text")


def duck_row(columns: list[duckfile.TargetColumn]) -> str:
    return _render([duck_value(c) for c in columns], "strlen")


def pg_hash(text_expr: str) -> str:
    """First 60 bits of md5 as a bigint, PostgreSQL."""
    return f"('x' || lpad(left(md5({text_expr}), 15), 16, '0'))::bit(64)::bigint"


def duck_hash(text_expr: str) -> str:
    """First 60 bits of md5 as a BIGINT, DuckDB."""
    return f"CAST('0x' || left(md5({text_expr}), 15) AS BIGINT)"
