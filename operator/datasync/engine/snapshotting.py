"""Loading a table's snapshot into DuckDB: bounded memory, parallel inside DuckDB.

Why this shape:
- The chunks come from :mod:`datasync.engine.reading` (binary COPY decoded in
  C, started before DuckDB is even imported).  Here their column buffers
  become Arrow arrays without a copy (integers, floats, decimals, dates,
  timestamps, intervals natively; text as strings) and DuckDB bulk-inserts
  them: no value passes through Python objects.  Columns selected as their
  output text get the same cast CDC uses (``sources.typemaps``).  ±infinity
  dates and timestamps arrive as the values DuckDB reads as ±infinity.
  Chunks that needed the text path arrive as CSV, parsed by pyarrow, every
  column cast with the CDC casts.
- Readers and DuckDB are joined by a bounded queue: reading the next chunk
  overlaps inserting the last one.  DuckDB pulls batches ahead of inserting
  them and holds each thread's unfinished row group, so the stream also waits
  while the decoded batches alive exceed a budget (``room_bytes``): memory is
  bounded independently of the table's size.  The decoder's buffers are
  sized from the reader's last chunk and recycled through a pool.
- The whole table goes into DuckDB as *one* ``INSERT`` over a stream of Arrow
  batches, the way DuckDB's own postgres_scanner loads: DuckDB's threads pull
  batches from the queue and each compresses and writes its own row groups as
  they fill (``write_buffer_row_group_count = 1``; insertion order is not kept,
  which lets DuckDB insert in parallel).  Each thread ends with a partial row
  group, which ``_gather_partial_row_groups`` then moves to the table's end.
  Compressing row groups is DuckDB's main cost.
  Earlier designs had a DuckDB connection per worker, each committing every few
  row groups: DuckDB compresses a transaction's unwritten row groups at commit,
  and commits run one at a time, so the workers queued behind each other and
  the copy stalled (measured: a CPU core idle for ~0.7 s of a 3 s copy of 1M
  rows); the Arrow chunks were also held until each commit.
- jsonb arrives as an ``arrow.json`` column: PostgreSQL only sends valid JSON,
  so DuckDB need not parse every document again.
- Rows land in a loading table that replaces the target table in one
  transaction at the end, so readers never see a half table and a crash
  mid-snapshot only leaves a loading table that the next attempt drops.
- Chunks that need the text path go through a second connection and
  transaction of their own, as they come.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv

from datasync import errors, identifiers
from datasync.engine import pgoutput, reading
from datasync.identifiers import quote
from datasync.sources import catalog
from datasync.targets import duckfile

if pgoutput.SPEEDUPS:
    from datasync.engine import _speedups  # type: ignore[attr-defined]

IN_FLIGHT_BYTES = 128 << 20  # decoded chunks DuckDB may hold before the stream waits (see room_bytes)
ROOM_WAIT = 0.1  # seconds, at most, per batch
ROW_GROUP_ROWS = 122_880  # DuckDB's
SMALL_PARTIAL_ROWS = ROW_GROUP_ROWS // 2  # partial row groups below this are gathered at the end
_KIND_TYPES = {
    "h": pa.int16(), "i": pa.int32(), "l": pa.int64(), "f": pa.float32(), "d": pa.float64(), "b": pa.uint8(),
    "D": pa.date32(), "t": pa.timestamp("us"), "T": pa.timestamp("us", tz="UTC"), "m": pa.time64("us"),
    "v": pa.month_day_nano_interval(), "y": pa.large_binary(), "u": pa.large_string(), "s": pa.large_string(),
    "j": pa.large_string(), "x": pa.large_string(),
}


@dataclasses.dataclass(frozen=True)
class BinaryPlan:
    """How each column travels in binary COPY (see :class:`reading.Plan`) and lands in DuckDB."""

    kinds: bytes
    scales: tuple[int, ...]
    types: tuple[pa.DataType, ...]
    select: tuple[str, ...]  # the COPY's select list
    insert: tuple[str, ...]  # the INSERT's select list over the Arrow chunk


def binary_plan(table: catalog.Table, plan: reading.Plan | None = None) -> BinaryPlan | None:
    plan = plan or reading.binary_plan(table)
    if plan is None:
        return None
    types, insert = [], []
    for i, (c, kind) in enumerate(zip(table.columns, plan.kinds.decode("ascii"), strict=True)):
        duck, col = c.duck_type, f"c{i}"
        if kind == "n":
            p, scale = (int(x) for x in duck[8:-1].split(","))
            types.append(pa.decimal128(p, scale))
        elif kind == "j" and duck == "JSON":
            # PostgreSQL sends jsonb as valid JSON: an arrow.json column lands as JSON
            # without DuckDB parsing every document again (~0.4 s of CPU per 1M rows)
            types.append(pa.json_(pa.large_string()))
        else:
            types.append(_KIND_TYPES[kind])
        if kind == "b":
            insert.append(f"CAST({col} AS BOOLEAN)")
        elif kind == "u":
            insert.append(f"CAST({col} AS UUID)")
        elif kind == "x" or (duck == "JSON" and kind != "j"):
            insert.append(c.mapping.cast(col))
        else:
            insert.append(col)
    return BinaryPlan(plan.kinds, plan.scales, tuple(types), plan.select, tuple(insert))


def read_binary(conn: Any, sql: str, plan: BinaryPlan, sizes: list[int] | None = None) -> pa.Table:
    """One binary COPY on ``conn``, as an Arrow table (see :func:`reading.read_binary`)."""
    nrows, columns = reading.read_binary(conn, sql, plan, sizes)
    return _arrow(nrows, columns, plan)


def _arrow(nrows: int, columns: list[tuple[Any, Any, Any]], plan: BinaryPlan) -> pa.Table:
    arrays = []
    for (valid, values, offsets), typ in zip(columns, plan.types, strict=True):
        bufs = [pa.py_buffer(valid), pa.py_buffer(values)]  # no copy: the decoder's own buffers
        if offsets is not None:
            bufs = [bufs[0], pa.py_buffer(offsets), bufs[1]]
        if isinstance(typ, pa.ExtensionType):
            arrays.append(pa.ExtensionArray.from_storage(typ, pa.Array.from_buffers(typ.storage_type, nrows, bufs)))
        else:
            arrays.append(pa.Array.from_buffers(typ, nrows, bufs))
    return pa.Table.from_arrays(arrays, names=[f"c{i}" for i in range(len(arrays))])


def read_csv(data: bytes | io.BytesIO, ncols: int) -> pa.Table:
    """PostgreSQL CSV (COPY … FORMAT csv) as string columns c0…; NULL is an unquoted empty field.

    A line break goes first and is skipped: pyarrow drops a byte-order mark at the start of
    its input, which would take a leading U+FEFF off the first value.  Empty lines are rows
    (a one-column NULL).
    """
    names = [f"c{i}" for i in range(ncols)]
    raw = data if isinstance(data, bytes) else data.getvalue()
    return pacsv.read_csv(
        io.BytesIO(b"\n" + raw),
        read_options=pacsv.ReadOptions(column_names=names, block_size=4 << 20, use_threads=False, skip_rows=1),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
        ),
    )


def _inserts(table: catalog.Table, target_name: identifiers.TableName, plan: BinaryPlan | None) -> dict[str, str]:
    """The INSERT of a decoded chunk into ``target_name``, by the chunk's shape."""
    cols = ", ".join(quote(c.name) for c in table.columns)
    selects = {"text": ", ".join(c.mapping.cast(f"c{i}") for i, c in enumerate(table.columns))}
    if plan is not None:
        selects["binary"] = ", ".join(plan.insert)
    return {
        shape: f"INSERT INTO {target_name.sql} ({cols}) SELECT {select} FROM _datasync_chunk"
        for shape, select in selects.items()
    }


def _batches(
    readers: reading.Readers, plan: BinaryPlan, threads: int
) -> Iterator[pa.RecordBatch]:
    """The decoded chunks as DuckDB pulls them (from its own threads), until the readers are done."""
    seen_rows = seen_bytes = 0
    while (decoded := reading.get(readers.decoded, readers.failed)) is not None:
        rows = _arrow(decoded[0], decoded[1], plan)
        seen_rows += rows.num_rows
        seen_bytes += rows.nbytes
        _wait_for_room(readers.failed, room_bytes(threads, seen_bytes / max(seen_rows, 1)))
        readers.events.put(rows.num_rows)
        yield from rows.to_batches()


def room_bytes(threads: int, bytes_per_row: float) -> float:
    """Decoded bytes DuckDB may hold before the stream waits.

    DuckDB keeps the batches of each thread's unfinished row group until that
    row group is written, so it needs a row group per thread (and one in hand)
    to make progress at all: the budget never goes below that, whatever the
    row width.
    """
    return max(float(IN_FLIGHT_BYTES), (threads + 1) * ROW_GROUP_ROWS * bytes_per_row)


def _wait_for_room(failed: threading.Event, room: float) -> None:
    """Hold the next batch back while DuckDB holds more than ``room`` decoded bytes.

    DuckDB pulls batches ahead of inserting them; when the readers are faster
    than its inserts, that backlog grew with the table (~1 GB of decoded chunks
    alive at 5M rows).  While the decoder's buffers alive exceed ``room`` the
    puller waits (DuckDB's other threads work the backlog off), at most
    ``ROOM_WAIT`` seconds per batch: never a deadlock.
    """
    if not pgoutput.SPEEDUPS:
        return
    deadline = time.monotonic() + ROOM_WAIT
    while _speedups.pool_stats()[5] > room and time.monotonic() < deadline and not failed.is_set():
        time.sleep(0.005)


def _out_of_range(table: catalog.Table, exc: duckdb.ConversionException) -> errors.TargetError:
    return errors.value_out_of_range(
        str(table.name),
        f"a value does not fit its DuckDB type: {str(exc).splitlines()[0]}",
        "fix or exclude the value at the source; the table's partial snapshot is not swapped in, "
        "a later run starts it over",
    )


def _inserting(con: Any, sql: str, source: object, table: catalog.Table, readers: reading.Readers) -> None:
    """One INSERT over the whole stream of binary chunks, in parallel inside DuckDB, one commit."""
    try:
        con.execute("SET preserve_insertion_order = false")  # lets DuckDB insert in parallel
        con.execute("SET write_buffer_row_group_count = 1")  # compress each row group as it fills
        con.register("_datasync_chunk", source)
        con.execute("BEGIN TRANSACTION")
        con.execute(sql)
        con.execute("COMMIT")
        readers.events.put(reading.DONE)
    except BaseException as exc:
        _failing(con, table, exc, readers)


def _loading_text(con: Any, sql: str, table: catalog.Table, readers: reading.Readers) -> None:
    """Chunks read through the text path (rare: huge intervals), each inserted as it comes."""
    try:
        con.execute("BEGIN TRANSACTION")
        while (data := reading.get(readers.texts, readers.failed)) is not None:
            rows = read_csv(data, len(table.columns))
            con.register("_datasync_chunk", rows)
            try:
                con.execute(sql)
            finally:
                con.unregister("_datasync_chunk")
            readers.events.put(rows.num_rows)
        con.execute("COMMIT")
        readers.events.put(reading.DONE)
    except BaseException as exc:
        _failing(con, table, exc, readers)


def _failing(con: Any, table: catalog.Table, exc: BaseException, readers: reading.Readers) -> None:
    """An inserting thread ends on ``exc``: roll back; report it, unless another thread failed first
    (then this is the fallout: that thread reports)."""
    _rollback(con)
    if isinstance(exc, reading.Failed) or readers.failed.is_set():
        readers.events.put(reading.DONE)
        return
    readers.failed.set()
    readers.events.put(_out_of_range(table, exc) if isinstance(exc, duckdb.ConversionException) else exc)


def _rollback(con: Any) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # no transaction open


def copy_table(
    readers: reading.Readers,
    target: duckfile.DuckTarget,
    target_name: identifiers.TableName,
    *,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Load what ``readers`` (started, or not yet) read into ``target_name`` (already created).

    One INSERT streams the binary chunks into DuckDB, which inserts with
    ``max(2, workers)`` threads (see the module docstring); text chunks go
    through a second connection.  Returns the number of rows.  The readers
    are stopped and joined however this ends.
    """
    table = readers.table
    row = target.con.execute("SELECT current_setting('threads')").fetchone()
    threads_before = int(row[0]) if row else 1
    collecting = gc.isenabled()
    cons: list[Any] = []
    threads: list[threading.Thread] = []
    total, done, read = 0, 0, 0
    try:
        plan = binary_plan(table, readers.plan)
        inserts = _inserts(table, target_name, plan)
        duck_threads = max(2, readers.workers)
        target.con.execute(f"SET threads = {duck_threads}")
        gc.disable()  # Arrow tables hold no cycles; the collector only rescans the heap (~0.25 s per 1M rows)
        cons = [target.con.cursor(), target.con.cursor()]
        threads.append(threading.Thread(target=_loading_text, args=(cons[0], inserts["text"], table, readers),
                                        daemon=True))
        if plan is not None:
            schema = pa.schema([pa.field(f"c{i}", typ) for i, typ in enumerate(plan.types)])
            batches = _batches(readers, plan, duck_threads)
            source = duckfile.arrow_stream(pa.RecordBatchReader.from_batches(schema, batches))
            threads.append(threading.Thread(target=_inserting, args=(cons[1], inserts["binary"], source, table, readers),
                                            daemon=True))
        readers.start()  # if it was not started ahead
        for t in threads:
            t.start()
        ending = len(threads) + readers.workers
        while done < ending:
            item = readers.events.get()
            if item is reading.DONE:
                done += 1
            elif item is reading.READ:
                done += 1
                read += 1
                if read == readers.workers:  # every chunk is decoded: the inserts may finish
                    try:
                        reading.put(readers.texts, None, readers.failed)
                        if plan is not None:
                            reading.put(readers.decoded, None, readers.failed)
                    except reading.Failed:
                        pass  # an insert failed: its exception is on its way
            elif isinstance(item, BaseException):
                raise item
            else:
                total += item
                if on_rows:
                    on_rows(item)
    except BaseException:
        readers.failed.set()
        raise
    finally:
        readers.join()
        for t in threads:
            if t.ident is not None:
                t.join()
        for con in cons:
            con.close()
        target.con.execute(f"SET threads = {threads_before}")
        if collecting:
            gc.enable()
        if pgoutput.SPEEDUPS:
            _speedups.pool_trim()  # the decoder's pooled buffers go back to the kernel: this copy is over
    _gather_partial_row_groups(target.con, target_name)
    return total


def _gather_partial_row_groups(con: Any, name: identifiers.TableName) -> None:
    """Move the rows of small partial row groups to the table's end, where they join.

    Each DuckDB thread ends its share of the INSERT with a partial row group,
    which then sits between full ones.  At a checkpoint DuckDB merges a window
    of up to three neighbouring row groups whose live rows fit in one fewer
    (``RowGroupCollection::ScheduleVacuumTasks``), rewriting all of them: a
    partial group of P rows in the middle is merged, with its neighbours, as
    soon as they lost P rows to deletes.  Measured on 270k changes (20k
    deletes) to a 1M-row copy: the first checkpoint went from 0.25 s to 0.9 s
    and the apply from ~200k to ~120k changes/s.

    Only the partial groups under half a row group are moved (re-inserted at
    the end, the originals deleted, which leaves wholly deleted groups that the
    checkpoint drops): a larger one needs more deletes around it than half a
    row group, and full groups merge after a row group's worth anyway.  Moving
    every partial group cost ~0.1 s of a ~3 s copy of 1M rows, all of it after
    the parallel part; this moves a quarter of those rows on average.
    """
    if '"' in name.schema or '"' in name.name:
        return  # pragma_storage_info's name parser drops a doubled quote (DuckDB 1.5.5): only speed is lost
    groups = con.execute(
        "SELECT row_group_id, max(count) FROM pragma_storage_info(?) GROUP BY ALL ORDER BY 1", [name.sql]
    ).fetchall()
    ranges = rows_to_gather([count for _, count in groups])
    if not ranges:
        return
    where = " OR ".join(f"(rowid >= {lo} AND rowid < {hi})" for lo, hi in ranges)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"INSERT INTO {name.sql} SELECT * FROM {name.sql} WHERE {where}")
        con.execute(f"DELETE FROM {name.sql} WHERE {where}")
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise


def rows_to_gather(counts: list[int]) -> list[tuple[int, int]]:
    """The rowid ranges to move to the end, given the row groups' row counts in table order.

    Every group under ``SMALL_PARTIAL_ROWS`` goes (the last one too: the moved rows land
    after it), unless the last group is the only such one: it is at the end already.
    """
    ranges, start = [], 0
    for count in counts:
        if count < SMALL_PARTIAL_ROWS:
            ranges.append((start, start + count))
        start += count
    if not ranges or ranges == [(start - counts[-1], start)]:
        return []
    return ranges
