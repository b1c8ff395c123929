"""Business rules: named SQL assertions about the copy.

A rule is a ``SELECT`` on the DuckDB copy.  Without ``compare_with_source`` every row it
returns is a violation ("projects without an owner"); with it, the same ``SELECT`` runs on
PostgreSQL (at the same LSN when the check is aligned) and the rule holds when both return
the same rows, in any order ("sum(amount) per day equals the source's").  Values are
compared by value, not by type: 10.50 (numeric) equals 10.5 (DOUBLE), a timestamptz equals
the same instant in any zone.

Only a single read-only statement is accepted: rules come from whoever may create a
ConsistencyCheck and run inside the writer, so a ``DELETE`` in a rule must not reach the copy.
On PostgreSQL rules run in a READ ONLY transaction.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import uuid
from typing import Any

import duckdb
import psycopg

from datasync import errors

SAMPLE = 10
MAX_ROWS = 1_000_000  # a compared result larger than this is a rule that should aggregate


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    sql: str
    compare_with_source: bool = False
    description: str | None = None


@dataclasses.dataclass
class RuleReport:
    name: str
    ok: bool
    violations: int  # rows returned (or rows by which the two results differ)
    sample: list[Any] = dataclasses.field(default_factory=list)
    message: str = ""

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse(text: str) -> Rule:
    """``NAME=SELECT ...`` (on the copy only) or ``NAME~=SELECT ...`` (compared with the source)."""
    for sep, compare in (("~=", True), ("=", False)):
        name, found, sql = text.partition(sep)
        if found and name.strip() and sql.strip() and (compare or "~" not in name):
            return Rule(name.strip(), sql.strip(), compare)
    raise errors.DataSyncError(
        f"cannot read rule {text!r}", "write NAME=SELECT ... (no rows expected) or NAME~=SELECT ... (same as the source)"
    )


def validate(rule: Rule) -> None:
    """Reject anything but one SELECT (DuckDB's parser decides, not a regex)."""
    try:
        statements = duckdb.extract_statements(rule.sql)
    except duckdb.Error as exc:
        raise errors.DataSyncError(f"rule {rule.name}: {str(exc).splitlines()[0]}", "fix the rule's SQL") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise errors.DataSyncError(f"rule {rule.name} is not a single SELECT", "rules may only read")


def _norm(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float | decimal.Decimal):
        try:
            d = decimal.Decimal(v) if not isinstance(v, float) else decimal.Decimal(repr(v))
            return d.normalize() if d.is_finite() else str(d)
        except decimal.InvalidOperation:
            return str(v)
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return v.astimezone(dt.UTC)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, list | tuple):
        return tuple(_norm(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _norm(x)) for k, x in v.items()))
    return v


def _show(row: tuple[Any, ...]) -> Any:
    vals = [v if isinstance(v, bool | int | float | str) or v is None else str(v) for v in row]
    return vals[0] if len(vals) == 1 else vals


def evaluate(rule: Rule, duck: duckdb.DuckDBPyConnection, pg: psycopg.Connection[Any] | None) -> RuleReport:
    validate(rule)
    try:
        if not rule.compare_with_source:
            row = duck.execute(f"SELECT count(*) FROM ({rule.sql}) _rule").fetchone()
            n = int(row[0]) if row else 0
            sample = [_show(r) for r in duck.execute(f"SELECT * FROM ({rule.sql}) _rule LIMIT {SAMPLE}").fetchall()] if n else []
            return RuleReport(rule.name, n == 0, n, sample, f"{n} row(s) violate the rule" if n else "holds")
        assert pg is not None
        mine = duck.execute(f"SELECT * FROM ({rule.sql}) _rule LIMIT {MAX_ROWS + 1}").fetchall()
        with pg.cursor() as cur:
            cur.execute(f"SELECT * FROM ({rule.sql}) _rule LIMIT {MAX_ROWS + 1}".replace("%", "%%"))
            theirs = cur.fetchall()
    except (duckdb.Error, psycopg.Error) as exc:
        return RuleReport(rule.name, False, 0, [], f"the rule failed to run: {str(exc).strip().splitlines()[0]}")
    if len(mine) > MAX_ROWS or len(theirs) > MAX_ROWS:
        return RuleReport(rule.name, False, 0, [], f"the rule returns over {MAX_ROWS} rows; aggregate it")
    a = collections.Counter(tuple(_norm(v) for v in r) for r in mine)
    b = collections.Counter(tuple(_norm(v) for v in r) for r in theirs)
    only_copy, only_source = a - b, b - a
    n = sum(only_copy.values()) + sum(only_source.values())
    sample = [{"side": "copy", "row": _show(r)} for r in list(only_copy)[:SAMPLE]]
    sample += [{"side": "source", "row": _show(r)} for r in list(only_source)[: SAMPLE - len(sample)]]
    msg = "same result on both sides" if n == 0 else f"{n} row(s) differ from the source's result"
    return RuleReport(rule.name, n == 0, n, sample, msg)
