"""Comparing a table's DuckDB copy with PostgreSQL: row counts and row hashes.

``data_hash`` partitions both sides by a hash of the key into buckets and
compares (count, sum of row hashes) per bucket — order-independent, one scan
per side, any key type (integer, text, uuid, composite, sparse).  Only buckets
that differ are fetched row by row (key + row hash) to name the keys that are
missing, extra or different.  Row hashes are computed by each database over the
same canonical rendering (``validation.canonical``), so no row data crosses the
wire unless it differs.

The score: a table scores ``100 × (1 − mismatched rows / max(source rows, target
rows))`` (100 for two empty tables); the overall score weights tables by that
row count.  It is stable: the same data always gives the same score.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

import duckdb
import psycopg

from datasync import identifiers
from datasync.targets import duckfile
from datasync.validation import canonical

CHECKS = ("row_count", "data_hash")
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
    repaired: int = 0
    # canonical keys of every mismatched row (not only the reported sample), for repair
    _keys: list[tuple[Any, ...]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def mismatches(self) -> int:
        if "data_hash" in self.checks:
            return self.missing + self.extra + self.differing
        return abs(self.rows_source - self.rows_target)

    @property
    def weight(self) -> int:
        return max(self.rows_source, self.rows_target)

    @property
    def score(self) -> float:
        return 100.0 if self.weight == 0 else round(100.0 * (1 - min(self.mismatches, self.weight) / self.weight), 4)

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("_keys", None)
        out["mismatched_keys"] = self.mismatched_keys[:MAX_KEYS]
        out["mismatched_keys_truncated"] = len(self.mismatched_keys) > MAX_KEYS
        out["mismatches"] = self.mismatches
        out["score"] = self.score
        return out


def overall_score(reports: list[TableReport]) -> float:
    total = sum(r.weight for r in reports)
    if total == 0:
        return 100.0
    return round(100.0 * (1 - sum(min(r.mismatches, r.weight) for r in reports) / total), 4)


def _buckets(rows: int) -> int:
    # ~250 rows a bucket: a divergence costs fetching one bucket's keys and hashes
    return max(1, min(65536, rows // 250))


def compare_table(
    pg: psycopg.Connection[Any], duck: duckdb.DuckDBPyConnection, state: duckfile.TableState, checks: list[str]
) -> TableReport:
    report = TableReport(str(state.source))
    src, tgt = state.source.sql, state.target.sql
    drow = duck.execute(f"SELECT count(*) FROM {tgt}").fetchone()
    report.rows_target = int(drow[0]) if drow else 0
    if "data_hash" in checks:  # counts the source rows on the way
        report.checks["data_hash"] = _data_hash(pg, duck, state, report)
    else:
        row = pg.execute(f"SELECT count(*) FROM {src}").fetchone()
        report.rows_source = int(row[0]) if row else 0
    if "row_count" in checks:
        report.checks["row_count"] = report.rows_source == report.rows_target
    report.ok = all(report.checks.values())
    return report


def _data_hash(
    pg: psycopg.Connection[Any], duck: duckdb.DuckDBPyConnection, state: duckfile.TableState, report: TableReport
) -> bool:
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
    missing = sorted(set(src_rows) - set(tgt_rows))
    extra = sorted(set(tgt_rows) - set(src_rows))
    differing = sorted(k for k in set(src_rows) & set(tgt_rows) if src_rows[k] != tgt_rows[k])
    report.missing, report.extra, report.differing = len(missing), len(extra), len(differing)

    def show(k: tuple[Any, ...]) -> Any:
        return k[0] if len(k) == 1 else list(k)

    report.mismatched_keys = [show(k) for k in (differing + missing + extra)[: MAX_KEYS + 1]]
    report._keys = differing + missing + extra
    return False


def render_key(key: tuple[Any, ...]) -> str:
    """The canonical rendering of a key, as ``canonical.pg_row``/``duck_row`` produce it."""
    return "|".join("~" if v is None else f"{len(str(v).encode())}:{v}" for v in key)


def repair(pg: psycopg.Connection[Any], duck: duckdb.DuckDBPyConnection, state: duckfile.TableState,
           keys: list[tuple[Any, ...]]) -> int:
    """Re-copy exactly the rows with ``keys`` from the source: delete them, insert the source's."""
    from datasync.engine import snapshotting
    from datasync.sources import typemaps

    if not keys:
        return 0
    cols = state.columns
    key_cols = sorted((c for c in cols if c.name in state.key), key=lambda c: state.key.index(c.name))
    rendered = [render_key(k) for k in keys]
    select = ", ".join(identifiers.quote(c.name) for c in cols)
    where = canonical.pg_row(key_cols).replace("%", "%%")
    buf = bytearray()
    with pg.cursor().copy(
        f"COPY (SELECT {select} FROM {state.source.sql} WHERE {where} = ANY(%s)) TO STDOUT (FORMAT csv)", (rendered,)
    ) as cp:
        for block in cp:
            buf += block
    casts = ", ".join(typemaps.Mapping(c.duck_type, c.pg_base).cast(f"c{i}") for i, c in enumerate(cols))
    duck.execute("BEGIN TRANSACTION")
    try:
        duck.execute(
            f"DELETE FROM {state.target.sql} WHERE {canonical.duck_row(key_cols)} IN (SELECT unnest(?::VARCHAR[]))",
            [rendered],
        )
        if buf:
            duck.register("_ds_repair", snapshotting.read_csv(bytes(buf), len(cols)))
            try:
                duck.execute(f"INSERT INTO {state.target.sql} SELECT {casts} FROM _ds_repair")
            finally:
                duck.unregister("_ds_repair")
        duck.execute("COMMIT")
    except BaseException:
        duck.execute("ROLLBACK")
        raise
    return len(keys)


def compare(
    source: str, target: str, tables: list[str], checks: list[str], *, fix: bool = False
) -> tuple[float, list[TableReport]]:
    """Compare ``tables`` (all synced tables when empty) of ``target`` with the source.

    ``fix``: re-copy the mismatching rows, then check again (the report says what was repaired).
    """
    from datasync import errors
    from datasync.sources import connecting

    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise errors.DataSyncError(f"unknown check(s) {', '.join(unknown)}", f"choose from {', '.join(CHECKS)}")
    try:
        duck = duckdb.connect(target, read_only=not fix)
        duck.execute("SET enable_progress_bar = false")  # stdout carries the report
    except duckdb.Error as exc:
        raise errors.TargetError(
            f"cannot open DuckDB target {target} for reading: {str(exc).splitlines()[0]}",
            "a running `datasync sync` holds the file; stop it, or check through the writer (operator)",
        ) from None
    try:
        try:
            states = duckfile.DuckTarget.read_states(duck)
        except duckdb.CatalogException:
            raise errors.TargetError(
                f"{target} is not a DataSync target (no _datasync schema)", "point --target at a file `datasync sync` wrote"
            ) from None
        names = [identifiers.TableName.parse(t) for t in tables] or sorted(states)
        missing = [str(n) for n in names if n not in states]
        if missing:
            raise errors.DataSyncError(
                f"{', '.join(missing)} not synced into {target}", "sync the table first, or fix its name"
            )
        with connecting.connect(source) as pg:
            reports = [compare_table(pg, duck, states[n], checks) for n in names]
            if fix:
                for i, (n, r) in enumerate(zip(names, reports, strict=True)):
                    if r.ok:
                        continue
                    if not r._keys:  # only counts were compared: find the rows first
                        r = compare_table(pg, duck, states[n], [*checks, "data_hash"])
                    fixed = repair(pg, duck, states[n], r._keys)
                    reports[i] = compare_table(pg, duck, states[n], checks)
                    reports[i].repaired = fixed
    finally:
        duck.close()
    return overall_score(reports), reports
