"""Reading a table's chunks from PostgreSQL as of an exported snapshot.

Why a module of its own, importing neither DuckDB nor pyarrow: the readers are
started before the target is ready.  A ``sync`` run spends its first ~0.2 s
importing DuckDB, pyarrow and the engine, with one core busy and the other
idle; readers started first keep PostgreSQL's COPY and the decoder (C, without
the GIL) busy meanwhile, filling their bounded queue for the load to start on.

- Chunks are CTID page ranges of each heap (leaf partitions for partitioned
  tables), read by N reader threads, each in a REPEATABLE READ transaction on
  the *same* exported snapshot: together they see one consistent state.
- Binary COPY where the C extension is built: ``_speedups.copy_decode`` runs
  ``COPY … TO STDOUT (FORMAT binary)`` through libpq (no Python call per row, no
  GIL) and hands back column buffers, which the load wraps as Arrow arrays.
  Types without a fixed binary layout are selected as their output text
  (``format('%s', c)``).  A chunk holding a value Arrow cannot represent (an
  interval beyond its nanoseconds, a timestamp past DuckDB's end) is re-read as
  CSV text, handed over as bytes.
- Queues are bounded: memory does not grow with the table, whether or not the
  load has started.
"""

from __future__ import annotations

import dataclasses
import io
import queue
import threading
from typing import Any, Protocol

from datasync import errors, identifiers
from datasync.engine import pgoutput
from datasync.identifiers import quote
from datasync.sources import catalog, connecting

if pgoutput.SPEEDUPS:
    from datasync.engine import _speedups  # type: ignore[attr-defined]

PAGES_PER_CHUNK = 1024
DONE = object()  # a thread of the copy ended
READ = object()  # a reader ended: no more chunks from it


@dataclasses.dataclass(frozen=True)
class Chunk:
    leaf: identifiers.TableName
    first_page: int
    end_page: int | None  # None: open-ended
    filenode: int = 0  # the leaf's file when planned: pages of another file are other rows


def plan_chunks(conn: Any, table: catalog.Table, pages_per_chunk: int | None = None) -> list[Chunk]:
    pages_per_chunk = pages_per_chunk or PAGES_PER_CHUNK
    chunks: list[Chunk] = []
    for leaf in table.leaves:
        row = conn.execute(
            "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::bigint, "
            "pg_relation_filenode(%s::regclass)",
            (leaf.sql, leaf.sql),
        ).fetchone()
        pages, filenode = (int(row[0]), int(row[1] or 0)) if row else (0, 0)
        start = 0
        while start + pages_per_chunk < pages:
            chunks.append(Chunk(leaf, start, start + pages_per_chunk, filenode))
            start += pages_per_chunk
        chunks.append(Chunk(leaf, start, None, filenode))
    return chunks


_TEXT_BASES = ("text", "varchar", "bpchar", "name", "json")
FIXED_KINDS = {
    "SMALLINT": "h", "INTEGER": "i", "BIGINT": "l", "FLOAT": "f", "DOUBLE": "d", "BOOLEAN": "b", "DATE": "D",
    "TIMESTAMP": "t", "TIMESTAMPTZ": "T", "TIME": "m", "INTERVAL": "v", "BLOB": "y", "UUID": "u",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How each column travels in binary COPY: its decoder kind, decimal scale, and select expression.

    Kinds: ``FIXED_KINDS``; ``n`` decimal; ``s`` text; ``j`` jsonb; ``x`` a
    type without a fixed binary layout, selected as its output text.
    """

    kinds: bytes
    scales: tuple[int, ...]
    select: tuple[str, ...]


def binary_plan(table: catalog.Table) -> Plan | None:
    """The table's binary COPY plan, or None where the C decoder was not built."""
    if not pgoutput.SPEEDUPS:
        return None
    kinds, scales, select = [], [], []
    for c in table.columns:
        q, duck, base = quote(c.name), c.duck_type, c.mapping.pg_base
        scale = 0
        if duck in FIXED_KINDS:
            kind = FIXED_KINDS[duck]
        elif duck.startswith("DECIMAL("):
            kind, scale = "n", int(duck[8:-1].split(",")[1])
        elif duck in ("VARCHAR", "JSON") and base in (*_TEXT_BASES, "jsonb"):
            kind = "j" if base == "jsonb" else "s"
        else:  # no fixed binary layout: its output text, cast like CDC does
            kind = "x"
        kinds.append(kind)
        scales.append(scale)
        select.append(f"CASE WHEN {q} IS NULL THEN NULL ELSE format('%s', {q}) END" if kind == "x" else q)
    return Plan(bytes("".join(kinds), "ascii"), tuple(scales), tuple(select))


class Layout(Protocol):
    """What decoding a binary COPY needs of a plan (:class:`Plan`, or the load's richer one)."""

    @property
    def kinds(self) -> bytes: ...

    @property
    def scales(self) -> tuple[int, ...]: ...

    @property
    def select(self) -> tuple[str, ...]: ...


Decoded = tuple[int, list[tuple[Any, Any, Any]]]  # rows, and per column (validity, data, offsets | None)


def read_binary(conn: Any, sql: str, plan: Layout, sizes: list[int] | None = None) -> Decoded:
    """Run binary ``COPY … TO STDOUT`` on psycopg2 connection ``conn``, decoded as it arrives.

    ``sizes``: kept by the caller between chunks (``new_sizes(plan)``): each
    column's buffers are reserved at the last chunk's sizes instead of grown.
    """
    import psycopg2._psycopg  # the module whose libpq holds ``conn``

    try:
        nrows, columns = _speedups.copy_decode(
            conn.pgconn_ptr, psycopg2._psycopg.__file__, sql, plan.kinds, plan.scales, sizes
        )
    except RuntimeError as exc:
        raise errors.SourceError(f"reading the snapshot failed: {str(exc).strip()}") from None
    return nrows, columns


def new_sizes(plan: Layout) -> list[int]:
    """A reader's buffer sizes for :func:`read_binary` (none known yet)."""
    return [0] * (3 * len(plan.kinds))


def _where(chunk: Chunk) -> str:
    cond = f"ctid >= '({chunk.first_page},0)'::tid"
    if chunk.end_page is not None:
        cond += f" AND ctid < '({chunk.end_page},0)'::tid"
    return cond


def text_sql(table: catalog.Table, chunk: Chunk) -> str:
    cols = ", ".join(quote(c.name) for c in table.columns)
    return f"COPY (SELECT {cols} FROM ONLY {chunk.leaf.sql} WHERE {_where(chunk)}) TO STDOUT (FORMAT csv)"


def binary_sql(plan: Layout, chunk: Chunk) -> str:
    return (
        f"COPY (SELECT {', '.join(plan.select)} FROM ONLY {chunk.leaf.sql} WHERE {_where(chunk)}) "
        "TO STDOUT (FORMAT binary)"
    )


class Failed(Exception):
    """Another thread of the copy failed: stop quietly (that thread reports)."""


def put(q: queue.Queue[Any], item: Any, failed: threading.Event) -> None:
    while True:
        if failed.is_set():
            raise Failed
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def get(q: queue.Queue[Any], failed: threading.Event) -> Any:
    while True:
        if failed.is_set():
            raise Failed
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


class Readers:
    """``workers`` threads reading ``chunks`` of ``table`` as of ``snapshot_id``.

    ``decoded`` gets binary chunks (:data:`Decoded`), ``texts`` the CSV bytes of
    chunks that needed the text path; ``events`` gets :data:`READ` from each
    reader as it ends, or the exception it failed with.  Setting ``failed``
    stops them (and any other thread of the copy).
    """

    def __init__(
        self, dsn: str, snapshot_id: str, table: catalog.Table, chunks: list[Chunk], *, workers: int = 2,
    ) -> None:
        self.dsn, self.snapshot_id, self.table = dsn, snapshot_id, table
        self.plan = binary_plan(table)
        self.workers = max(1, min(workers, len(chunks)))
        self.filenodes = {c.leaf: c.filenode for c in chunks}
        self.work: queue.Queue[Chunk | None] = queue.Queue()
        for chunk in chunks:
            self.work.put(chunk)
        for _ in range(self.workers):
            self.work.put(None)
        self.decoded: queue.Queue[Any] = queue.Queue(maxsize=2 * self.workers)  # bounds memory
        self.texts: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.events: queue.Queue[Any] = queue.Queue()
        self.failed = threading.Event()
        self.threads = [threading.Thread(target=self._reading, daemon=True) for _ in range(self.workers)]
        self.started = False

    def start(self) -> Readers:
        """Start reading (once: later calls do nothing)."""
        if not self.started:
            self.started = True
            for t in self.threads:
                t.start()
        return self

    def stop(self) -> None:
        """Stop reading (the copy failed or was abandoned) and wait for the readers to end."""
        self.failed.set()
        self.join()

    def join(self) -> None:
        for t in self.threads:
            if t.ident is not None:
                t.join()

    def _lock_planned(self, conn: Any) -> None:
        """Hold the leaves as planned until this reader's transaction ends, or fail.

        Chunks are page ranges: a rewrite (VACUUM FULL, CLUSTER, a rewriting ALTER TABLE)
        between the planning and a reader's first read would give that reader pages of
        another file, holding other rows.  Once locked, no rewrite can come; one that came
        before shows as a new file.
        """
        leaves = sorted(self.filenodes, key=lambda leaf: leaf.sql)
        if not leaves:
            return
        cur = conn.cursor()
        cur.execute(f"LOCK TABLE {', '.join(f'ONLY {leaf.sql}' for leaf in leaves)} IN ACCESS SHARE MODE")
        for leaf in leaves:
            cur.execute("SELECT pg_relation_filenode(%s::regclass)", (leaf.sql,))
            row = cur.fetchone()
            if row is None or int(row[0] or 0) != self.filenodes[leaf]:
                raise errors.SourceError(
                    f"{leaf} was rewritten while its snapshot was being read (VACUUM FULL, CLUSTER or an "
                    "ALTER TABLE that rewrites it)",
                    "nothing was lost: run the sync again, and it copies the table anew",
                )

    def _reading(self) -> None:
        """Read chunks as of the snapshot: binary ones onto ``decoded``, text ones onto ``texts``."""
        plan, failed = self.plan, self.failed
        try:
            conn = connecting.connect_libpq2(self.dsn)
            try:
                conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
                conn.cursor().execute("SET TRANSACTION SNAPSHOT %s", (self.snapshot_id,))
                self._lock_planned(conn)
                sizes = new_sizes(plan) if plan is not None else None
                while (chunk := self.work.get()) is not None:
                    if failed.is_set():
                        raise Failed
                    if plan is not None:
                        try:
                            nrows, columns = read_binary(conn, binary_sql(plan, chunk), plan, sizes)
                            if nrows:
                                put(self.decoded, (nrows, columns), failed)
                            continue
                        except pgoutput.NeedsText:
                            pass
                    buf = io.BytesIO()
                    conn.cursor().copy_expert(text_sql(self.table, chunk), buf)
                    if buf.tell():
                        put(self.texts, buf.getvalue(), failed)
                conn.rollback()
            finally:
                conn.close()
            self.events.put(READ)
        except Failed:
            self.events.put(DONE)
        except BaseException as exc:  # handed to the loading thread, which re-raises
            failed.set()
            self.events.put(exc)
