"""PostgreSQL → DuckDB type mapping.

One table decides, per PostgreSQL base type, the DuckDB column type and the SQL
that turns PostgreSQL's *text* output into it.  CDC (pgoutput, text mode), the
snapshot's CSV fallback and the back-fills hand us PostgreSQL's exact text
rendering, so a single cast expression serves them all.  The snapshot's binary
COPY decodes the fixed layouts in C (``datasync.engine.reading``) and selects the
other types as that same text; tests compare the paths value by value.

Where DuckDB has no native type that holds every value exactly (unconstrained
``numeric``, ``inet``, arrays, enums, ranges, …) the column is ``VARCHAR`` with
PostgreSQL's exact text form.  The README's type table is generated from
:data:`DOC_ROWS` so the docs cannot drift from the code.
"""

from __future__ import annotations

import dataclasses

_SIMPLE: dict[str, str] = {
    "int2": "SMALLINT",
    "int4": "INTEGER",
    "int8": "BIGINT",
    "oid": "UBIGINT",
    "float4": "FLOAT",
    "float8": "DOUBLE",
    "bool": "BOOLEAN",
    "text": "VARCHAR",
    "varchar": "VARCHAR",
    "bpchar": "VARCHAR",
    "name": "VARCHAR",
    "bytea": "BLOB",
    "date": "DATE",
    "time": "TIME",
    "timetz": "TIMETZ",
    "timestamp": "TIMESTAMP",
    "timestamptz": "TIMESTAMPTZ",
    "interval": "INTERVAL",
    "uuid": "UUID",
    "json": "JSON",
    "jsonb": "JSON",
}

DOC_ROWS: list[tuple[str, str, str]] = [
    ("smallint, integer, bigint", "SMALLINT, INTEGER, BIGINT", "exact"),
    ("numeric(p,s), p ≤ 38", "DECIMAL(p,s)",
     "exact; NaN has no DECIMAL form and becomes NULL (so a NaN in a key column cannot be matched)"),
    ("numeric (no precision), p > 38", "VARCHAR", "exact text: huge values, NaN, ±Infinity"),
    ("real, double precision", "FLOAT, DOUBLE", "exact (shortest round-trip text), NaN, ±Infinity"),
    ("boolean", "BOOLEAN", "exact"),
    ("text, varchar(n), char(n), name", "VARCHAR", "exact (char(n) keeps its padding)"),
    ("bytea", "BLOB", "exact bytes"),
    ("date, time, timestamp", "DATE, TIME, TIMESTAMP",
     "exact (µs); ±infinity and BC dates kept; timestamps after 294247-01-10 (DuckDB's end) stop the sync with an error"),
    ("timetz, timestamptz", "TIMETZ, TIMESTAMPTZ", "exact instant (µs), UTC; same range as timestamp"),
    ("interval", "INTERVAL",
     "exact months/days/µs; 'infinity' (PostgreSQL 17+) and 1,000,000,000 hours or more stop the sync with an error"),
    ("uuid", "UUID", "exact"),
    ("json, jsonb", "JSON",
     "exact text (json keeps its formatting); json with an unpaired surrogate escape (`\\ud800`) stops the sync "
     "with an error"),
    ("inet, cidr, macaddr, money, xml, ranges, …", "VARCHAR", "exact text form"),
    ("arrays (any element type)", "VARCHAR", "exact text form, e.g. {1,NULL,3}"),
    ("enums", "VARCHAR", "label"),
    ("domains", "type of the base type", "as the base type"),
]


@dataclasses.dataclass(frozen=True)
class Mapping:
    duck_type: str
    pg_base: str

    def cast(self, expr: str) -> str:
        """SQL turning PostgreSQL's text form in ``expr`` into ``duck_type``."""
        if self.duck_type == "VARCHAR":
            return expr
        if self.duck_type == "BLOB":
            return f"from_hex(substr({expr}, 3))"
        if self.duck_type == "INTERVAL":
            # DuckDB reads PostgreSQL's interval style but not explicit '+' signs
            return f"CAST(replace({expr}, '+', '') AS INTERVAL)"
        if self.duck_type.startswith("DECIMAL"):
            return f"TRY_CAST({expr} AS {self.duck_type})"
        if self.duck_type in ("DATE", "TIMESTAMP", "TIMESTAMPTZ"):
            # PostgreSQL writes BC dates as '0044-03-15 BC'; DuckDB reads '0044-03-15 (BC)'
            bc = rf"regexp_replace(left({expr}, -3), '^(\d+-\d+-\d+)', '\1 (BC)')"
            return f"CAST(CASE WHEN ends_with({expr}, ' BC') THEN {bc} ELSE {expr} END AS {self.duck_type})"
        return f"CAST({expr} AS {self.duck_type})"


def numeric_precision(typmod: int) -> tuple[int, int] | None:
    if typmod < 4:
        return None
    raw = typmod - 4
    precision = (raw >> 16) & 0xFFFF
    scale = raw & 0x7FF
    if scale & 0x400:  # negative scale (PostgreSQL 15+)
        scale -= 0x800
    return precision, scale


def map_type(base: str, typmod: int, category: str) -> Mapping:
    """Map a PostgreSQL base type (domains already resolved) to DuckDB."""
    if category == "A":
        return Mapping("VARCHAR", base)
    if base == "numeric":
        ps = numeric_precision(typmod)
        if ps is not None and 1 <= ps[0] <= 38 and 0 <= ps[1] <= ps[0]:
            return Mapping(f"DECIMAL({ps[0]},{ps[1]})", base)
        return Mapping("VARCHAR", base)
    return Mapping(_SIMPLE.get(base, "VARCHAR"), base)
