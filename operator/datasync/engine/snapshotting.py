"""Parallel, bounded-memory snapshot of one table into DuckDB.

Why this shape:
- Binary COPY end to end where the C extension is built: PostgreSQL sends each
  chunk with ``COPY … TO STDOUT (FORMAT binary)``; ``_speedups.decode_copy_binary``
  turns it into Arrow buffers (integers, floats, decimals, dates, timestamps,
  intervals natively; text as strings); DuckDB bulk-inserts the Arrow table.  No
  value passes through Python objects.  Types without a fixed binary layout are
  selected as their output text (``format('%s', c)``) and get the same cast CDC
  uses (``sources.typemaps``).  A chunk holding a value Arrow cannot represent
  (±infinity) is re-read through the text path: ``COPY … (FORMAT csv)`` parsed by
  pyarrow, every column cast with the CDC casts.
- Chunks are CTID page ranges of each heap (leaf partitions for partitioned
  tables), read by N reader threads, each in a REPEATABLE READ transaction on
  the *same* exported snapshot: together they see one consistent state.
- A bounded queue between readers and the single DuckDB writer bounds memory
  by (queue size × chunk size), independent of the table's size.
- Rows land in a loading table, committed every ``COMMIT_ROWS`` rows: DuckDB's
  memory for one uncommitted transaction grows with its size (measured: 0.9 GB
  at 1M rows, 1.8 GB at 4M), periodic commits keep it flat.  The loading table
  replaces the target table in one transaction at the end, so readers never
  see a half table and a crash mid-snapshot only leaves a loading table that
  the next attempt drops.
"""

from __future__ import annotations

import dataclasses
import io
import queue
import threading
from collections.abc import Callable
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv

from datasync import errors, identifiers
from datasync.engine import pgoutput
from datasync.identifiers import quote
from datasync.sources import catalog, connecting
from datasync.targets import duckfile

PAGES_PER_CHUNK = 1024
COMMIT_ROWS = 250_000
_DONE = object()


@dataclasses.dataclass(frozen=True)
class Chunk:
    leaf: identifiers.TableName
    first_page: int
    end_page: int | None  # None: open-ended


def plan_chunks(conn: Any, table: catalog.Table, pages_per_chunk: int = PAGES_PER_CHUNK) -> list[Chunk]:
    chunks: list[Chunk] = []
    for leaf in table.leaves:
        row = conn.execute(
            "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::bigint", (leaf.sql,)
        ).fetchone()
        pages = int(row[0]) if row else 0
        start = 0
        while start + pages_per_chunk < pages:
            chunks.append(Chunk(leaf, start, start + pages_per_chunk))
            start += pages_per_chunk
        chunks.append(Chunk(leaf, start, None))
    return chunks


_TEXT_BASES = ("text", "varchar", "bpchar", "name", "json")
_FIXED_KINDS = {
    "SMALLINT": ("h", pa.int16()), "INTEGER": ("i", pa.int32()), "BIGINT": ("l", pa.int64()),
    "FLOAT": ("f", pa.float32()), "DOUBLE": ("d", pa.float64()), "BOOLEAN": ("b", pa.uint8()),
    "DATE": ("D", pa.date32()), "TIMESTAMP": ("t", pa.timestamp("us")),
    "TIMESTAMPTZ": ("T", pa.timestamp("us", tz="UTC")), "TIME": ("m", pa.time64("us")),
    "INTERVAL": ("v", pa.month_day_nano_interval()), "BLOB": ("y", pa.large_binary()),
    "UUID": ("u", pa.large_string()),
}


@dataclasses.dataclass(frozen=True)
class BinaryPlan:
    """How each column travels in binary COPY and lands in DuckDB."""

    kinds: bytes
    scales: tuple[int, ...]
    types: tuple[pa.DataType, ...]
    select: tuple[str, ...]  # the COPY's select list
    insert: tuple[str, ...]  # the INSERT's select list over the Arrow chunk


def binary_plan(table: catalog.Table) -> BinaryPlan | None:
    if not pgoutput.SPEEDUPS:
        return None
    kinds, scales, types, select, insert = [], [], [], [], []
    for i, c in enumerate(table.columns):
        q, duck, base = quote(c.name), c.duck_type, c.mapping.pg_base
        scale = 0
        if duck in _FIXED_KINDS:
            kind, typ = _FIXED_KINDS[duck]
        elif duck.startswith("DECIMAL("):
            p, scale = (int(x) for x in duck[8:-1].split(","))
            kind, typ = "n", pa.decimal128(p, scale)
        elif duck in ("VARCHAR", "JSON") and base in (*_TEXT_BASES, "jsonb"):
            kind, typ = ("j" if base == "jsonb" else "s"), pa.large_string()
        else:  # no fixed binary layout: its output text, cast like CDC does
            kind, typ = "x", pa.large_string()
        kinds.append(kind)
        scales.append(scale)
        types.append(typ)
        select.append(f"CASE WHEN {q} IS NULL THEN NULL ELSE format('%s', {q}) END" if kind == "x" else q)
        col = f"c{i}"
        if kind == "b":
            insert.append(f"CAST({col} AS BOOLEAN)")
        elif kind == "u":
            insert.append(f"CAST({col} AS UUID)")
        elif kind in ("x",) or duck == "JSON":
            insert.append(c.mapping.cast(col))
        else:
            insert.append(col)
    return BinaryPlan(bytes("".join(kinds), "ascii"), tuple(scales), tuple(types), tuple(select), tuple(insert))


def decode_binary(data: bytes | memoryview, plan: BinaryPlan) -> pa.Table:
    from datasync.engine import _speedups  # type: ignore[attr-defined]

    nrows, columns = _speedups.decode_copy_binary(data, plan.kinds, plan.scales)
    arrays = []
    for (valid, values, offsets), typ in zip(columns, plan.types, strict=True):
        bufs = [pa.py_buffer(valid), pa.py_buffer(values)]
        if offsets is not None:
            bufs = [bufs[0], pa.py_buffer(offsets), bufs[1]]
        arrays.append(pa.Array.from_buffers(typ, nrows, bufs))
    return pa.Table.from_arrays(arrays, names=[f"c{i}" for i in range(len(arrays))])


def _where(chunk: Chunk) -> str:
    cond = f"ctid >= '({chunk.first_page},0)'::tid"
    if chunk.end_page is not None:
        cond += f" AND ctid < '({chunk.end_page},0)'::tid"
    return cond


def _copy_sql(table: catalog.Table, chunk: Chunk) -> str:
    cols = ", ".join(quote(c.name) for c in table.columns)
    return f"COPY (SELECT {cols} FROM ONLY {chunk.leaf.sql} WHERE {_where(chunk)}) TO STDOUT (FORMAT csv)"


def _binary_sql(plan: BinaryPlan, chunk: Chunk) -> str:
    return (
        f"COPY (SELECT {', '.join(plan.select)} FROM ONLY {chunk.leaf.sql} WHERE {_where(chunk)}) "
        "TO STDOUT (FORMAT binary)"
    )


def read_csv(data: bytes | io.BytesIO, ncols: int) -> pa.Table:
    names = [f"c{i}" for i in range(ncols)]
    return pacsv.read_csv(
        io.BytesIO(data) if isinstance(data, bytes) else data,
        read_options=pacsv.ReadOptions(column_names=names, block_size=4 << 20, use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
        ),
    )


def _reader(
    dsn: str, snapshot_id: str, table: catalog.Table, work: queue.Queue[Chunk | None],
    out: queue.Queue[Any], failed: threading.Event,
) -> None:
    try:
        conn = connecting.connect_libpq2(dsn)
        try:
            conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
            cur = conn.cursor()
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_id,))
            plan = binary_plan(table)
            while not failed.is_set():
                chunk = work.get()
                if chunk is None:
                    break
                buf = io.BytesIO()
                if plan is not None:
                    cur.copy_expert(_binary_sql(plan, chunk), buf)  # the per-row loop runs in C
                    try:
                        with buf.getbuffer() as view:  # no copy of the chunk
                            table_ = decode_binary(view, plan)
                        out.put(("binary", table_))
                        continue
                    except pgoutput.NeedsText:
                        buf = io.BytesIO()
                cur.copy_expert(_copy_sql(table, chunk), buf)
                if buf.tell():
                    buf.seek(0)
                    out.put(("text", read_csv(buf, len(table.columns))))
            conn.rollback()
        finally:
            conn.close()
        out.put(_DONE)
    except BaseException as exc:  # handed to the writer thread, which re-raises
        failed.set()
        out.put(exc)


def copy_table(
    dsn: str,
    snapshot_id: str,
    table: catalog.Table,
    target: duckfile.DuckTarget,
    target_name: identifiers.TableName,
    chunks: list[Chunk],
    *,
    workers: int = 2,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Copy ``table`` as of ``snapshot_id`` into ``target_name`` (already created).

    Commits every ``COMMIT_ROWS`` rows (see the module docstring).  Returns the
    number of rows.
    """
    work: queue.Queue[Chunk | None] = queue.Queue()
    for chunk in chunks:
        work.put(chunk)
    workers = max(1, min(workers, len(chunks)))
    for _ in range(workers):
        work.put(None)
    out: queue.Queue[Any] = queue.Queue(maxsize=workers + 1)
    failed = threading.Event()
    threads = [
        threading.Thread(target=_reader, args=(dsn, snapshot_id, table, work, out, failed), daemon=True)
        for _ in range(workers)
    ]
    for t in threads:
        t.start()
    cols = ", ".join(quote(c.name) for c in table.columns)
    text_select = ", ".join(c.mapping.cast(f"c{i}") for i, c in enumerate(table.columns))
    plan = binary_plan(table)
    inserts = {"text": f"INSERT INTO {target_name.sql} ({cols}) SELECT {text_select} FROM _datasync_chunk"}
    if plan is not None:
        inserts["binary"] = f"INSERT INTO {target_name.sql} ({cols}) SELECT {', '.join(plan.insert)} FROM _datasync_chunk"
    total, done, uncommitted = 0, 0, 0
    target.begin()
    try:
        while done < workers:
            item = out.get()
            if item is _DONE:
                done += 1
                continue
            if isinstance(item, BaseException):
                raise item
            shape, item = item
            if item.num_rows == 0:
                continue
            target.con.register("_datasync_chunk", item)
            try:
                target.con.execute(inserts[shape])
            except duckdb.ConversionException as exc:
                raise errors.TargetError(
                    f"{table.name}: a value does not fit its DuckDB type: {str(exc).splitlines()[0]}",
                    "DuckDB's TIMESTAMP/TIMESTAMPTZ end at 294247-01-10 (PostgreSQL's at 294276): fix or exclude "
                    "the value at the source; the table's partial snapshot is not swapped in, a later run starts it over",
                ) from None
            finally:
                target.con.unregister("_datasync_chunk")
            total += item.num_rows
            uncommitted += item.num_rows
            if uncommitted >= COMMIT_ROWS:
                target.commit()
                target.begin()
                uncommitted = 0
            if on_rows:
                on_rows(item.num_rows)
        target.commit()
    except BaseException:
        target.rollback()
        failed.set()
        while True:  # unblock readers waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                break
        raise
    finally:
        for t in threads:
            t.join(timeout=0.1 if failed.is_set() else None)
    return total
