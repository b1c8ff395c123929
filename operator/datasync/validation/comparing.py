"""Comparing a table's DuckDB copy with PostgreSQL: row counts and row hashes.

``data_hash`` partitions both sides by a hash of the key into buckets and
compares (count, sum of row hashes) per bucket — order-independent, one scan
per side, any key type (integer, text, uuid, composite, sparse).  Only buckets
that differ are fetched row by row (key + row hash) to name the keys that are
missing, extra or different.  Row hashes are computed by each database over the
same canonical rendering (``validation.canonical``), so no row data crosses the
wire unless it differs.

The consistency score (stable: the same data always gives the same score) counts
*rows that are wrong*, once for each way they are wrong::

    score = 100 × (1 − min(bad, total) / total)        (100 when total is 0)
    total = Σ over tables of max(source rows, target rows)
    bad   = Σ over tables of (rows missing, extra or different — or, when only row_count
            runs, the difference of the counts — plus rows violating a foreign key)
          + Σ over business rules of the rows they report (violations, or rows by which
            the copy's result differs from the source's)

A table therefore weighs as much as it has rows, and a table's own score is the same
formula over that table alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
from typing import Any

import duckdb
import psycopg
import pyarrow as pa

from datasync import identifiers
from datasync.targets import duckfile
from datasync.validation import canonical, hashing, references, rules

CHECKS = ("row_count", "data_hash", "business_rules", "referential_integrity")
MAX_KEYS = 100


@dataclasses.dataclass
class TableReport:
    table: str
    ok: bool = True
    rows_source: int = 0
    rows_target: int = 0
    missing: int = 0
    extra: int = 0
    differing: int = 0
    mismatched_keys: list[Any] = dataclasses.field(default_factory=list)
    checks: dict[str, bool] = dataclasses.field(default_factory=dict)
    orphans: int = 0  # rows violating a foreign key (referential_integrity)
    foreign_keys: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    repaired: int = 0
    # canonical keys of every mismatched row (not only the reported sample), for repair
    _keys: list[tuple[Any, ...]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def mismatches(self) -> int:
        """Rows missing, extra or different (data_hash), else the difference of the counts."""
        if "data_hash" in self.checks:
            return self.missing + self.extra + self.differing
        if "row_count" in self.checks:
            return abs(self.rows_source - self.rows_target)
        return 0

    @property
    def bad(self) -> int:
        return self.mismatches + self.orphans

    @property
    def weight(self) -> int:
        return max(self.rows_source, self.rows_target)

    @property
    def score(self) -> float:
        return _score(self.bad, self.weight)

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("_keys", None)
        out["mismatched_keys"] = self.mismatched_keys[:MAX_KEYS]
        out["mismatched_keys_truncated"] = len(self.mismatched_keys) > MAX_KEYS
        out["mismatches"] = self.mismatches
        out["bad_rows"] = self.bad
        out["score"] = self.score
        return out


def _score(bad: int, total: int) -> float:
    return 100.0 if total == 0 else round(100.0 * (1 - min(bad, total) / total), 4)


def overall_score(reports: list[TableReport], rule_reports: list[rules.RuleReport] | None = None) -> float:
    bad = sum(min(r.bad, r.weight) for r in reports) + sum(r.violations for r in rule_reports or [])
    return _score(bad, sum(r.weight for r in reports))


@dataclasses.dataclass
class Run:
    """One check run: what was compared, at which position, and the outcome."""

    tables: list[TableReport]
    rules: list[rules.RuleReport]
    lsn: int | None  # the source position both sides were compared at (None: not aligned)
    started: dt.datetime
    duration: float = 0.0
    note: str = ""

    @property
    def score(self) -> float:
        return overall_score(self.tables, self.rules)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables) and all(r.ok for r in self.rules)

    def as_json(self) -> dict[str, Any]:
        from datasync.engine import pgoutput

        out: dict[str, Any] = {
            "consistency_score": self.score,
            "ok": self.ok,
            "lsn": None if self.lsn is None else pgoutput.format_lsn(self.lsn),
            "aligned": self.lsn is not None,
            "started": self.started.isoformat(),
            "duration_seconds": round(self.duration, 3),
            "tables": [t.as_json() for t in self.tables],
        }
        if self.rules:
            out["rules"] = [r.as_json() for r in self.rules]
        if self.note:
            out["note"] = self.note
        return out


def _buckets(rows: int) -> int:
    # ~1000 rows a bucket: a divergence costs fetching one bucket's keys and hashes (cheap), while
    # fewer buckets keep PostgreSQL's hash aggregate small
    return max(1, min(65536, rows // 1000))


def compare_table(
    pg: psycopg.Connection[Any],
    duck: duckdb.DuckDBPyConnection,
    state: duckfile.TableState,
    checks: list[str],
    states: dict[identifiers.TableName, duckfile.TableState] | None = None,
    declared: list[references.ForeignKey] | None = None,
    extra: list[duckdb.DuckDBPyConnection] | None = None,
) -> TableReport:
    """``row_count``, ``data_hash`` and ``referential_integrity`` of one table (both sides as given)."""
    report = TableReport(str(state.source))
    src, tgt = state.source.sql, state.target.sql
    drow = duck.execute(f"SELECT count(*) FROM {tgt}").fetchone()
    report.rows_target = int(drow[0]) if drow else 0
    if "data_hash" in checks:  # counts the source rows on the way
        report.checks["data_hash"] = _data_hash(pg, duck, state, report, extra or [])
    else:
        row = pg.execute(f"SELECT count(*) FROM {src}").fetchone()
        report.rows_source = int(row[0]) if row else 0
    if "row_count" in checks:
        report.checks["row_count"] = report.rows_source == report.rows_target
    if "referential_integrity" in checks:
        report.checks["referential_integrity"] = _references(
            pg, duck, state, states or {state.source: state}, report, declared or []
        )
    report.ok = all(report.checks.values())
    return report


def _references(
    pg: psycopg.Connection[Any],
    duck: duckdb.DuckDBPyConnection,
    state: duckfile.TableState,
    states: dict[identifiers.TableName, duckfile.TableState],
    report: TableReport,
    declared: list[references.ForeignKey],
) -> bool:
    ok = True
    keys = references.foreign_keys(pg, state.source)
    seen = {(k.columns, k.parent, k.parent_columns) for k in keys}
    keys += [k for k in declared if k.child == state.source and (k.columns, k.parent, k.parent_columns) not in seen]
    for key in keys:
        entry: dict[str, Any] = {"name": key.name, "references": str(key.parent), "columns": list(key.columns)}
        if key.parent not in states:
            entry["skipped"] = f"{key.parent} is not synced into this target"
        else:
            found = references.check(duck, key, states)
            entry["orphans"] = found.orphans
            entry["sample_keys"] = found.sample
            report.orphans += found.orphans
            ok = ok and found.orphans == 0
        report.foreign_keys.append(entry)
    return ok


def check_all(
    pg: psycopg.Connection[Any],
    duck: duckdb.DuckDBPyConnection,
    states: dict[identifiers.TableName, duckfile.TableState],
    names: list[identifiers.TableName],
    checks: list[str],
    rule_list: list[rules.Rule],
    declared: list[references.ForeignKey] | None = None,
    extra: list[duckdb.DuckDBPyConnection] | None = None,
) -> tuple[list[TableReport], list[rules.RuleReport]]:
    """Every check on ``names`` and every rule, on the two connections as they stand.

    ``extra``: more DuckDB read transactions at exactly ``duck``'s position, to scan in parallel.
    """
    tables = [compare_table(pg, duck, states[n], checks, states, declared, extra) for n in names]
    done = [rules.evaluate(r, duck, pg) for r in rule_list] if "business_rules" in checks else []
    return tables, done


def _tune(pg: psycopg.Connection[Any]) -> None:
    """Per transaction: a parallel hash aggregate, hashes computed in the worker.

    PostgreSQL cannot estimate how many buckets ``key % n`` makes, assumes one per row and
    sorts every row (row hash computed after the sort, in the leader alone); with sorting
    off and room for the bucket table it aggregates in parallel instead (4x).  One parallel
    worker at most: a check runs on the production primary and should not take its cores
    (and on small machines the copy's side needs a core of its own anyway).
    """
    if pg.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        pg.execute(
            "SELECT set_config('enable_sort', 'off', true), set_config('work_mem', '64MB', true), "
            "set_config('max_parallel_workers_per_gather', '1', true)"
        )


def _data_hash(
    pg: psycopg.Connection[Any], duck: duckdb.DuckDBPyConnection, state: duckfile.TableState, report: TableReport,
    extra: list[duckdb.DuckDBPyConnection] | None = None,
) -> bool:
    if not hashing.AVAILABLE:
        return _data_hash_text(pg, duck, state, report)
    plan = hashing.Plan.of(state)
    nb = _buckets(report.rows_target)
    src, tgt = state.source.sql, state.target.sql
    pg_bucket = plan.pg_bucket(nb)
    row_hash = plan.pg_row_hash()
    _tune(pg)
    # First the whole table on the source (no grouping: cheaper) while the copy is summed per
    # bucket; only when the totals differ does the source sum per bucket too.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        total_future = pool.submit(lambda: pg.execute(f"SELECT count(*), sum({row_hash}) FROM {src}").fetchone())
        duck_sums = plan.duck_buckets(duck, tgt, nb, extra or [])
        total = total_future.result()
    pg_total = (int(total[0]), hashing.unsigned(total[1] or 0)) if total else (0, 0)
    duck_total = (sum(n for n, _ in duck_sums.values()), hashing.unsigned(sum(h for _, h in duck_sums.values())))
    report.rows_source = pg_total[0]
    if pg_total == duck_total:
        return True
    pg_sums = {
        int(b): (int(n), hashing.unsigned(h))
        for b, n, h in pg.execute(
            f"SELECT b, count(*), sum(h) FROM (SELECT {pg_bucket} AS b, {row_hash} AS h FROM {src}) s GROUP BY b"
        ).fetchall()
    }
    bad = sorted(b for b in set(pg_sums) | set(duck_sums) if pg_sums.get(b) != duck_sums.get(b))
    keys = sorted((c for c in state.columns if c.name in state.key), key=lambda c: state.key.index(c.name))
    pg_keys = ", ".join(canonical.pg_value(k) for k in keys)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pg_future = pool.submit(
            lambda: pg.execute(
                f"SELECT {pg_keys}, {row_hash} FROM {src} WHERE {pg_bucket} = ANY(".replace("%", "%%") + "%s)", (bad,)
            ).fetchall()
        )
        by_rowid = plan.duck_rows_in(duck, tgt, nb, bad)
        duck_keys = ", ".join(canonical.duck_value(k) for k in keys)
        # rowids travel as Arrow: DuckDB converts a Python list parameter element by element (slowly)
        view = f"_ds_rowids_{id(by_rowid)}"
        duck.register(view, pa.table({"r": pa.array(list(by_rowid), pa.int64())}))
        try:
            found = duck.execute(f"SELECT rowid, {duck_keys} FROM {tgt} WHERE rowid IN (SELECT r FROM {view})").fetchall()
        finally:
            duck.unregister(view)
        src_rows = {tuple(r[:-1]): hashing.unsigned(r[-1]) for r in pg_future.result()}
    tgt_rows = {tuple(r[1:]): hashing.unsigned(by_rowid[int(r[0])]) for r in found}
    _report_rows(report, src_rows, tgt_rows)
    return False


def _report_rows(report: TableReport, src_rows: dict[tuple[Any, ...], int], tgt_rows: dict[tuple[Any, ...], int]) -> None:
    missing = sorted(set(src_rows) - set(tgt_rows))
    extra = sorted(set(tgt_rows) - set(src_rows))
    differing = sorted(k for k in set(src_rows) & set(tgt_rows) if src_rows[k] != tgt_rows[k])
    report.missing, report.extra, report.differing = len(missing), len(extra), len(differing)

    def show(k: tuple[Any, ...]) -> Any:
        return k[0] if len(k) == 1 else list(k)

    report.mismatched_keys = [show(k) for k in (differing + missing + extra)[: MAX_KEYS + 1]]
    report._keys = differing + missing + extra


def _data_hash_text(
    pg: psycopg.Connection[Any], duck: duckdb.DuckDBPyConnection, state: duckfile.TableState, report: TableReport
) -> bool:
    """The portable path (no C extension): md5 over the canonical text of each row, both sides."""
    cols = state.columns
    keys = [c for c in cols if c.name in state.key]
    keys.sort(key=lambda c: state.key.index(c.name))
    nb = _buckets(report.rows_target)
    if len(keys) == 1 and keys[0].duck_type in ("SMALLINT", "INTEGER", "BIGINT"):
        # an integer key buckets by itself: no hashing, same on both sides
        k = identifiers.quote(keys[0].name)
        pg_bucket = duck_bucket = f"((({k} % {nb}) + {nb}) % {nb})"
    else:
        pg_key, duck_key = canonical.pg_row(keys), canonical.duck_row(keys)
        pg_bucket = f"({canonical.pg_hash(pg_key)} % {nb})"
        duck_bucket = f"({canonical.duck_hash(duck_key)} % {nb})"
    pg_h, duck_h = canonical.pg_hash(canonical.pg_row(cols)), canonical.duck_hash(canonical.duck_row(cols))
    src, tgt = state.source.sql, state.target.sql
    # both sides scan at once: each database works on its own cores while we wait
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pg_future = pool.submit(
            lambda: pg.execute(
                f"SELECT b, count(*), sum(h) FROM (SELECT {pg_bucket} AS b, {pg_h} AS h FROM {src}) s GROUP BY b"
            ).fetchall()
        )
        duck_rows = duck.execute(
            f"SELECT b, count(*), sum(h) FROM (SELECT {duck_bucket} AS b, {duck_h} AS h FROM {tgt}) s GROUP BY b"
        ).fetchall()
        pg_rows = pg_future.result()
    pg_sums = {int(b): (int(n), int(h)) for b, n, h in pg_rows}
    report.rows_source = sum(n for n, _ in pg_sums.values())
    duck_sums = {
        int(b): (int(n), int(h))
        for b, n, h in duck_rows
    }
    bad = sorted(b for b in set(pg_sums) | set(duck_sums) if pg_sums.get(b) != duck_sums.get(b))
    if not bad:
        return True
    key_exprs_pg = [canonical.pg_value(k) for k in keys]
    key_exprs_duck = [canonical.duck_value(k) for k in keys]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pg_future = pool.submit(
            lambda: pg.execute(
                f"SELECT {', '.join(key_exprs_pg)}, {pg_h} FROM {src} WHERE {pg_bucket} = ANY(".replace("%", "%%")
                + "%s)",
                (bad,),
            ).fetchall()
        )
        duck_found = duck.execute(
            f"SELECT {', '.join(key_exprs_duck)}, {duck_h} FROM {tgt} WHERE list_contains(?, {duck_bucket})", [bad]
        ).fetchall()
        src_rows = {tuple(r[:-1]): int(r[-1]) for r in pg_future.result()}
    tgt_rows = {tuple(r[:-1]): int(r[-1]) for r in duck_found}
    _report_rows(report, src_rows, tgt_rows)
    return False


def render_key(key: tuple[Any, ...]) -> str:
    """The canonical rendering of a key, as ``canonical.pg_row``/``duck_row`` produce it."""
    return "|".join("~" if v is None else f"{len(str(v).encode())}:{v}" for v in key)


def fetch_rows(pg: psycopg.Connection[Any], state: duckfile.TableState, keys: list[tuple[Any, ...]]) -> bytes:
    """The source's current rows with ``keys`` (canonical key tuples), as CSV."""
    cols = state.columns
    key_cols = sorted((c for c in cols if c.name in state.key), key=lambda c: state.key.index(c.name))
    select = ", ".join(identifiers.quote(c.name) for c in cols)
    where = canonical.pg_row(key_cols).replace("%", "%%")
    buf = bytearray()
    with pg.cursor().copy(
        f"COPY (SELECT {select} FROM {state.source.sql} WHERE {where} = ANY(%s)) TO STDOUT (FORMAT csv)",
        ([render_key(k) for k in keys],),
    ) as cp:
        for block in cp:
            buf += block
    return bytes(buf)


def write_rows(duck: duckdb.DuckDBPyConnection, state: duckfile.TableState, keys: list[tuple[Any, ...]],
               rows: bytes) -> int:
    """Replace the copy's rows with ``keys`` by ``rows`` (from :func:`fetch_rows`), in one transaction."""
    from datasync.engine import snapshotting
    from datasync.sources import typemaps

    cols = state.columns
    key_cols = sorted((c for c in cols if c.name in state.key), key=lambda c: state.key.index(c.name))
    casts = ", ".join(typemaps.Mapping(c.duck_type, c.pg_base).cast(f"c{i}") for i, c in enumerate(cols))
    keys_view = f"_ds_repair_keys_{id(keys)}"
    duck.register(keys_view, pa.table({"k": pa.array([render_key(k) for k in keys], pa.string())}))
    duck.execute("BEGIN TRANSACTION")
    try:
        duck.execute(f"DELETE FROM {state.target.sql} WHERE {canonical.duck_row(key_cols)} IN (SELECT k FROM {keys_view})")
        if rows:
            view = f"_ds_repair_{id(rows)}"
            duck.register(view, snapshotting.read_csv(rows, len(cols)))
            try:
                duck.execute(f"INSERT INTO {state.target.sql} SELECT {casts} FROM {view}")
            finally:
                duck.unregister(view)
        duck.execute("COMMIT")
    except BaseException:
        duck.execute("ROLLBACK")
        raise
    finally:
        duck.unregister(keys_view)
    return len(keys)


def repair(pg: psycopg.Connection[Any], duck: duckdb.DuckDBPyConnection, state: duckfile.TableState,
           keys: list[tuple[Any, ...]]) -> int:
    """Re-copy exactly the rows with ``keys`` from the source: delete them, insert the source's."""
    if not keys:
        return 0
    return write_rows(duck, state, keys, fetch_rows(pg, state, keys))
