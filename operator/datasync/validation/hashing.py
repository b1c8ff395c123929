"""Row hashes both databases agree on, computed the cheap way on PostgreSQL.

PostgreSQL hashes a row with ``hash_record_extended(ROW(c1, c2, ...), 0)``: each column's own
extended hash function over its binary value, combined as ``h = 31·h + column hash`` (NULL
hashes to 0).  That is several times cheaper than rendering the row as text and digesting
it, and the row's bytes never leave the server.  The copy's rows are hashed with the same
functions by ``_pghash`` (C) over the Arrow batches DuckDB produces, so the two hashes are
equal exactly when the values are.

Each column is hashed *natively* when its type has a hash both sides can compute exactly
(integers, booleans, dates, timestamps, floats, numerics, text, bytes, uuids, times); any
other type is hashed through its canonical text (``validation.canonical``) on both sides —
still cheap, and exact by construction.  ``jsonb`` is hashed by PostgreSQL's jsonb hash on the
source and replayed on the canonical text the copy stores (a malformed text hashes to a value
no jsonb has, so it shows up as a difference).  Text is hashed under the "C" collation, so a nondeterministic collation on
the source cannot make equal bytes hash differently.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa

from datasync.identifiers import quote
from datasync.targets import duckfile
from datasync.validation import canonical

try:
    from datasync.validation import _pghash  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the extension is built with the package; canonical md5 is the fallback
    _pghash = None

AVAILABLE = _pghash is not None

K_I16, K_I32, K_I64, K_BOOL, K_DATE, K_TS, K_F32, K_F64 = 1, 2, 3, 4, 5, 6, 7, 8
K_DEC128, K_NUMTEXT, K_TEXT, K_BPCHAR, K_UUIDTEXT, K_TIME, K_JSONB = 9, 10, 11, 12, 13, 14, 15

_NATIVE = {
    "SMALLINT": K_I16, "INTEGER": K_I32, "BIGINT": K_I64, "BOOLEAN": K_BOOL, "DATE": K_DATE,
    "TIMESTAMP": K_TS, "TIMESTAMPTZ": K_TS, "FLOAT": K_F32, "REAL": K_F32, "DOUBLE": K_F64, "TIME": K_TIME,
    "BLOB": K_TEXT, "UUID": K_UUIDTEXT,
}
_TEXT_BASES = ("text", "varchar", "name")
BATCH_ROWS = 122_880


@dataclasses.dataclass(frozen=True)
class Column:
    kind: int
    pg: str  # the expression inside ROW(...)
    duck: str  # the DuckDB projection hashed with ``kind``
    scale: int = 0


def column(col: duckfile.TargetColumn) -> Column:
    q = quote(col.name)
    t = col.duck_type
    if t in _NATIVE and not (t == "BLOB" and col.pg_base != "bytea"):
        kind = _NATIVE[t]
        duck = f"CAST({q} AS VARCHAR)" if kind == K_UUIDTEXT else q
        return Column(kind, q, duck)
    if t.startswith("DECIMAL"):
        scale = int(t[t.index(",") + 1 : t.index(")")]) if "," in t else 0
        return Column(K_DEC128, q, q, scale)
    if t == "VARCHAR" and col.pg_base == "numeric":
        return Column(K_NUMTEXT, q, q)
    if t == "VARCHAR" and col.pg_base in _TEXT_BASES:
        return Column(K_TEXT, f'({q} COLLATE "C")', q)
    if t == "VARCHAR" and col.pg_base == "bpchar":
        return Column(K_BPCHAR, q, q)
    if t == "JSON" and col.pg_base == "jsonb":
        return Column(K_JSONB, q, q)  # jsonb's own hash, replayed on its canonical text
    if t == "JSON" and col.pg_base == "json":
        return Column(K_TEXT, f'({q}::text COLLATE "C")', q)  # json keeps its text verbatim
    # anything else: the canonical text both sides render identically
    return Column(K_TEXT, f'(({canonical.pg_value(col)})::text COLLATE "C")', canonical.duck_value(col))


@dataclasses.dataclass
class Plan:
    """How to hash one table's rows and bucket them by key, on both sides."""

    columns: list[Column]
    keys: list[int]  # positions of the key columns in ``columns``
    int_key: bool  # one integer key column: it buckets by itself

    @classmethod
    def of(cls, state: duckfile.TableState) -> Plan:
        cols = list(state.columns)
        keys = [next(i for i, c in enumerate(cols) if c.name == k) for k in state.key]
        int_key = len(keys) == 1 and cols[keys[0]].duck_type in ("SMALLINT", "INTEGER", "BIGINT")
        return cls([column(c) for c in cols], keys, int_key)

    def pg_row_hash(self) -> str:
        return f"hash_record_extended(ROW({', '.join(c.pg for c in self.columns)}), 0)"

    def pg_bucket(self, nb: int) -> str:
        if self.int_key:
            k = self.columns[self.keys[0]].pg
            return f"((({k} % {nb}) + {nb}) % {nb})"
        key_row = ", ".join(self.columns[i].pg for i in self.keys)
        return f"(((hash_record_extended(ROW({key_row}), 0) % {nb}) + {nb}) % {nb})"

    def duck_select(self, extra: str = "") -> str:
        return ", ".join([*(c.duck for c in self.columns), *([extra] if extra else [])])

    # -- the copy's side ----------------------------------------------------------
    def _spec(self, batch: pa.RecordBatch) -> list[tuple[int, ...]]:
        spec: list[tuple[int, ...]] = []
        for i, col in enumerate(self.columns):
            arr = batch.column(i)
            bufs = arr.buffers()
            validity = bufs[0].address if bufs[0] is not None and arr.null_count else 0
            kind = col.kind
            if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
                spec.append((kind, arr.offset, validity, bufs[2].address if bufs[2] is not None else 0,
                             bufs[1].address, 0, 0))
            elif pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
                spec.append((kind, arr.offset, validity, bufs[2].address if bufs[2] is not None else 0,
                             bufs[1].address, 1, 0))
            else:
                if kind == K_DEC128 and arr.type.byte_width != 16:
                    raise TypeError(f"unexpected Arrow type {arr.type} for a DECIMAL column")
                spec.append((kind, arr.offset, validity, bufs[1].address, 0, 0, col.scale))
        return spec

    def _batches(self, duck: duckdb.DuckDBPyConnection, table: str, extra: str = "") -> Iterator[pa.RecordBatch]:
        reader = duck.execute(f"SELECT {self.duck_select(extra)} FROM {table}").to_arrow_reader(BATCH_ROWS)
        yield from reader

    def duck_buckets(self, duck: duckdb.DuckDBPyConnection, table: str, nb: int,
                     extra: list[duckdb.DuckDBPyConnection] | None = None) -> dict[int, tuple[int, int]]:
        """bucket → (rows, sum of row hashes mod 2⁶⁴) of the copy.

        With ``extra`` read transactions (at the same position as ``duck``) the table is split
        into rowid ranges scanned in parallel: DuckDB converts a result to Arrow on one thread.
        """
        readers = [duck, *(extra or [])]
        row = duck.execute(f"SELECT min(rowid), max(rowid) FROM {table}").fetchone() if len(readers) > 1 else None
        if row is None or row[0] is None:
            parts = [self._sum_part(duck, table, nb)]
        else:
            lo, hi = int(row[0]), int(row[1])
            step = (hi - lo) // len(readers) + 1
            ranges = [f"{table} WHERE rowid >= {lo + i * step} AND rowid < {lo + (i + 1) * step}" for i in range(len(readers))]
            with concurrent.futures.ThreadPoolExecutor(len(readers), thread_name_prefix="scan") as pool:
                parts = list(pool.map(lambda cur, source: self._sum_part(cur, source, nb), readers, ranges))
        out: dict[int, tuple[int, int]] = {}
        for part in parts:
            for b, (n, h) in part.items():
                n0, h0 = out.get(b, (0, 0))
                out[b] = (n0 + n, (h0 + h) & 0xFFFFFFFFFFFFFFFF)
        return out

    def _sum_part(self, duck: duckdb.DuckDBPyConnection, source: str, nb: int) -> dict[int, tuple[int, int]]:
        counts, sums = bytearray(8 * nb), bytearray(8 * nb)
        n = len(self.columns)

        def add(batch: pa.RecordBatch) -> None:
            _pghash.aggregate(self._spec(batch), batch.num_rows, self.int_key, self.keys, nb, n, counts, sums)

        # DuckDB converts to Arrow on one thread: hash batch i (GIL released) while it converts i+1
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pghash") as pool:
            pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()
            for batch in self._batches(duck, source):
                pending.append(pool.submit(add, batch))
                if len(pending) > 2:
                    pending.popleft().result()
            for future in pending:
                future.result()
        cv, sv = memoryview(counts).cast("q"), memoryview(sums).cast("Q")
        return {b: (cv[b], sv[b]) for b in range(nb) if cv[b]}

    def duck_rows_in(self, duck: duckdb.DuckDBPyConnection, table: str, nb: int, buckets: list[int]) -> dict[int, int]:
        """rowid → row hash of the copy's rows in ``buckets``."""
        wanted = bytearray(nb)
        for b in buckets:
            wanted[b] = 1
        out: dict[int, int] = {}
        n = len(self.columns)
        for batch in self._batches(duck, table, "rowid"):
            rowids = batch.column(n)
            for i, h in _pghash.collect(self._spec(batch), batch.num_rows, self.int_key, self.keys, nb, n, bytes(wanted)):
                out[int(rowids[i].as_py())] = h
        return out


def record_hashes(batch: pa.RecordBatch, kinds: list[Column]) -> list[int]:
    """Row hashes of a batch (for tests: compared with PostgreSQL's value by value)."""
    plan = Plan(kinds, [], False)
    return [unsigned(h) for h in _pghash.record_hashes(plan._spec(batch), batch.num_rows)]


def unsigned(v: Any) -> int:
    return int(v) & 0xFFFFFFFFFFFFFFFF
