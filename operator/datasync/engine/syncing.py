"""One sync run: check the source, ensure publication and slot, snapshot, stream.

The order is the data path of DESIGN.md: every check first (so a failure leaves
nothing behind), then publication and slot (the slot before any snapshot, so no
change can fall between snapshot and stream), then the snapshot of each table
not yet copied, then CDC.  Tables a target already holds stay part of the sync:
dropping one silently would let the slot advance past its changes.

DuckDB, pyarrow and the modules built on them are imported only once the first
snapshot's readers run (:mod:`datasync.engine.reading`): on a new target the
~0.2 s those imports take overlaps PostgreSQL's COPY instead of preceding it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
from typing import TYPE_CHECKING, Protocol

import psycopg2

from datasync import errors, identifiers
from datasync.engine import reading
from datasync.sources import catalog, checking, connecting, replication

if TYPE_CHECKING:  # imported where used: see the module docstring
    from datasync.engine import pinning, streaming
    from datasync.targets import duckfile

log = logging.getLogger(__name__)
_snapshots = itertools.count(1)  # numbers the temporary snapshot slots of this process


@dataclasses.dataclass
class Options:
    source: str
    target: str
    tables: list[str]
    follow: bool = False
    slot: str | None = None
    publication: str | None = None
    snapshot_workers: int = 2
    batch_changes: int = 50_000
    max_batch_seconds: float = 0.5
    poll_seconds: float = 0.1
    memory_limit: str | None = "256MB"
    #: served while streaming: work to run in the writer at an exact point (consistency checks)
    pins: pinning.Pins | None = None


class Reporter(Protocol):
    def snapshot_started(self, table: identifiers.TableName, est_rows: int) -> None: ...
    def snapshot_rows(self, table: identifiers.TableName, rows: int) -> None: ...
    def snapshot_done(self, table: identifiers.TableName, rows: int, seconds: float) -> None: ...
    def batch(self, stats: streaming.Stats) -> None: ...


class QuietReporter:
    def snapshot_started(self, table: identifiers.TableName, est_rows: int) -> None:
        log.info("snapshot of %s started (~%d rows)", table, est_rows)

    def snapshot_rows(self, table: identifiers.TableName, rows: int) -> None:
        pass

    def snapshot_done(self, table: identifiers.TableName, rows: int, seconds: float) -> None:
        log.info("snapshot of %s: %d rows in %.1fs", table, rows, seconds)

    def batch(self, stats: streaming.Stats) -> None:
        pass


@dataclasses.dataclass
class Result:
    slot: str
    publication: str
    snapshotted: dict[identifiers.TableName, int]
    stats: streaming.Stats
    rows: dict[identifiers.TableName, int]


def _target_columns(table: catalog.Table) -> list[duckfile.TargetColumn]:
    from datasync.targets import duckfile

    return [
        duckfile.TargetColumn(c.name, c.type_oid, c.typmod, c.duck_type, c.mapping.pg_base, c.attnum)
        for c in table.columns
    ]


@dataclasses.dataclass
class Created:
    """What :func:`ensure_replication` created, to be undone if the run cannot start."""

    publication: bool = False
    tables: list[identifiers.TableName] = dataclasses.field(default_factory=list)  # added to an existing one
    slot: bool = False

    def undo(self, conn: connecting.Connection, publication: str, slot: str) -> None:
        """Drop what was created; a failure here is logged, not raised (it must not hide why)."""
        try:
            if self.slot:
                replication.drop_slot(conn, slot)
            if self.publication:
                replication.drop_publication(conn, publication)
            elif self.tables:
                replication.drop_tables(conn, publication, self.tables)
        except psycopg2.Error:
            log.warning("could not drop the replication slot/publication this run created", exc_info=True)


def ensure_replication(
    conn: connecting.Connection, publication: str, slot: str, tables: list[catalog.Table]
) -> Created:
    """Create/extend the publication and create the slot; undo on failure."""
    created = Created()
    try:
        existing = replication.publication_tables(conn, publication)
        if existing is None:
            replication.create_publication(conn, publication, [t.name for t in tables])
            created.publication = True
        else:
            added = [t.name for t in tables if t.name not in existing]
            replication.add_tables(conn, publication, added)
            created.tables = added
        if replication.slot_info(conn, slot) is None:
            replication.create_slot(conn, slot)
            created.slot = True
    except psycopg2.Error as exc:
        created.undo(conn, publication, slot)
        raise errors.SourceError(f"could not set up logical replication: {exc}".strip()) from None
    return created


class _Target:
    """The DuckDB target, opened when first needed.

    A target file that does not exist yet holds no table: everything up to the
    first snapshot's readers runs without DuckDB.  An existing one is opened
    at once (its tables decide what to snapshot).
    """

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.new = not any(os.path.exists(opts.target + suffix) for suffix in ("", ".wal"))
        self.opened: duckfile.DuckTarget | None = None
        if self.new:
            _check_writable(opts.target)

    def get(self) -> duckfile.DuckTarget:
        if self.opened is None:
            from datasync.targets import duckfile

            self.opened = duckfile.DuckTarget(self.opts.target, memory_limit=self.opts.memory_limit)
        return self.opened

    def states(self) -> dict[identifiers.TableName, duckfile.TableState]:
        return {} if self.new else self.get().table_states()

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


def _check_writable(path: str) -> None:
    """A new target's directory must exist and be writable: found out before a slot is created."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise errors.TargetError(
            f"cannot create DuckDB target {path}: {folder} is not a writable directory",
            "check that the path is a writable DuckDB database file in an existing directory",
        )


def snapshot(opts: Options, table: catalog.Table, target: _Target, slot: str, reporter: Reporter) -> int:
    import time

    started = time.monotonic()
    # one name per snapshot: the previous table's temporary slot may not be dropped yet (its
    # walsender exits after the connection closes), and a reused name failed as a duplicate
    suffix = f"_snap_{os.getpid()}_{next(_snapshots)}"
    tmp_slot = slot[: 63 - len(suffix)] + suffix
    with replication.exported_snapshot(opts.source, tmp_slot) as snap:
        reader = connecting.connect(opts.source, autocommit=False)
        try:
            reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            reader.execute(f"SET TRANSACTION SNAPSHOT '{snap.snapshot_id}'")
            chunks = reading.plan_chunks(reader, table)
            row = reader.execute(
                "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::bigint FROM pg_class WHERE oid = ANY(%s::regclass[])",
                ([leaf.sql for leaf in table.leaves],),
            ).fetchone()
            est = int(row[0]) if row else 0
            reader.rollback()
        finally:
            reader.close()
        readers = reading.Readers(opts.source, snap.snapshot_id, table, chunks, workers=opts.snapshot_workers).start()
        made: tuple[duckfile.DuckTarget, identifiers.TableName] | None = None  # the loading table, once created
        try:
            # the readers fill their queue while DuckDB is imported and the target made ready
            from datasync.engine import snapshotting
            from datasync.targets import duckfile

            duck = target.get()
            reporter.snapshot_started(table.name, est)
            state = duckfile.TableState(
                table.name, table.name, "snapshotting", snap.consistent_lsn, _target_columns(table), list(table.key),
                0, table.max_attnum,
            )
            loading = identifiers.TableName(state.target.schema, f"_datasync_load_{state.target.name}")
            duck.begin()
            duck.create_table(loading, state.columns)
            duck.save_table_state(state)
            duck.commit()
            made = (duck, loading)
            rows = snapshotting.copy_table(
                readers, duck, loading, on_rows=lambda n: reporter.snapshot_rows(table.name, n),
            )
        except BaseException:
            readers.stop()  # (copy_table stops them itself once it runs: stopping twice is harmless)
            if made is not None:
                _drop_partial(*made)
            raise
        state.state = "streaming"
        state.rows_snapshotted = rows
        duck.begin()
        try:
            duck.replace_table(state.target, loading)
            duck.save_table_state(state)
            duck.commit()
        except BaseException:
            duck.rollback()
            raise
    reporter.snapshot_done(table.name, rows, time.monotonic() - started)
    return rows


def _drop_partial(duck: duckfile.DuckTarget, loading: identifiers.TableName) -> None:
    """A failed snapshot leaves no half-loaded table in the user's schema (its state row stays:
    the next run snapshots the table anew)."""
    try:
        duck.drop_table(loading)
    except Exception:  # the snapshot's own error is the one to report
        log.warning("could not drop the partly loaded %s", loading, exc_info=True)


class _SlotGone(Exception):
    """The slot disappeared while a ``--follow`` run streamed it (a slot of the same name may be
    there again, made after the changes it missed): the run starts over and copies anew."""


def run(opts: Options, reporter: Reporter | None = None, stop: threading.Event | None = None) -> Result:
    reporter = reporter or QuietReporter()
    stop = stop or threading.Event()
    copy_anew = False
    while True:
        try:
            return _run(opts, reporter, stop, copy_anew)
        except _SlotGone:
            copy_anew = True  # the gap is in no slot: the run starts over and copies the tables anew


def _run(opts: Options, reporter: Reporter, stop: threading.Event, copy_anew: bool = False) -> Result:
    names = [identifiers.TableName.parse(t) for t in opts.tables]
    slot = opts.slot or replication.derive_name(opts.target)
    publication = opts.publication or slot
    control: connecting.Connection = connecting.connect(opts.source)
    try:
        checking.check_server(control)
        tables = checking.check_tables(control, names)  # before the target file is created
        target = _Target(opts)
        try:
            states = target.states()
            extra = [known for known in states if known not in names]
            tables += checking.check_tables(control, extra)
            todo = [t for t in tables if t.name not in states or states[t.name].state != "streaming"]
            if len(todo) < len(tables):  # the target streams some tables: through a slot still there?
                if copy_anew:
                    todo = _slot_gone(f"replication slot {slot} was dropped while this run streamed it", tables)
                elif replication.slot_info(control, slot) is None:
                    todo = _slot_gone(f"replication slot {slot} does not exist", tables)
                    _warn_of_other_slots(control, target.get(), slot)
            checking.check_publication(control, publication, tables)
            checking.check_slots(control, slot, bool(todo))
            # before the slot is made: a new slot then starts past it (nothing to receive, below)
            until = replication.wait_flushed(control)
            created = ensure_replication(control, publication, slot, tables)
            try:
                snapshotted = {t.name: snapshot(opts, t, target, slot, reporter) for t in todo}
            except BaseException:
                if target.opened is None:  # a new target could not be created: leave the source as it was
                    created.undo(control, publication, slot)
                raise
            from datasync.engine import streaming

            duck = target.get()
            backoff = 0.5
            info = replication.slot_info(control, slot)
            known = info.confirmed_flush if info else 0  # the slot is never past this and our confirmations
            if not opts.follow and known >= until:
                # nothing to receive: the slot is past this run's end (made by this very run, after
                # `until`, its tables' snapshots holding everything before; or no WAL since the last
                # run). Opening the stream would start a walsender only to learn that (~30 ms on
                # loopback, and a decoding process on the source).
                applied = duck.checkpoint(slot)[0]
                if slot not in duck.checkpoint_slots():  # the target names the slots it was streamed through
                    duck.begin()
                    try:
                        duck.write_checkpoint(slot, applied, None)
                        duck.commit()
                    except BaseException:
                        duck.rollback()
                        raise
                stats = streaming.Stats(applied_lsn=applied, confirmed_lsn=max(applied, known))
            else:
                while True:
                    stream = streaming.ChangeStream(
                        dsn=opts.source, control=control, target=duck, slot=slot, publication=publication,
                        states=duck.table_states(), batch_changes=opts.batch_changes,
                        max_batch_seconds=opts.max_batch_seconds, poll_seconds=opts.poll_seconds,
                        on_batch=reporter.batch, pins=opts.pins,
                    )
                    try:
                        stats = stream.run(None if opts.follow else until, stop)
                        break
                    except (psycopg2.OperationalError, errors.SourceError) as exc:
                        # --follow rides out source restarts and network blips: the stream
                        # resumes from the target's checkpoint, nothing is lost or repeated
                        if not opts.follow or stop.is_set():
                            raise
                        log.warning("source connection lost (%s); reconnecting in %.1fs", str(exc).strip(), backoff)
                        if stop.wait(backoff):
                            stats = stream.stats
                            break
                        backoff = min(backoff * 2, 30.0)
                        control = _reconnect(opts.source, control, stop)
                        known = max(known, stream.confirmed)
                        info = replication.slot_info(control, slot)
                        if info is None or info.confirmed_flush > known:
                            # dropped under us (and made again by someone else, if past what we confirmed):
                            # the changes since our last confirmation are in no slot
                            raise _SlotGone from None
            rows = {n: duck.count(st.target) for n, st in duck.table_states().items()}
            return Result(slot, publication, snapshotted, stats, rows)
        finally:
            target.close()
    finally:
        control.close()


def _slot_gone(why: str, tables: list[catalog.Table]) -> list[catalog.Table]:
    """The target streams tables through a slot that is gone: copy them all anew.

    Changes committed while no slot existed (dropped by hand, or the target
    synced before under another ``--slot``) were kept for no one: a new slot
    starts after them, and streaming on would leave that gap in the copy for
    good.  Copying the tables again is the only way to an exact copy.
    """
    log.warning("%s: changes committed meanwhile were kept by no slot; copying %d table(s) anew", why, len(tables))
    return list(tables)


def _warn_of_other_slots(control: connecting.Connection, duck: duckfile.DuckTarget, slot: str) -> None:
    """Slots this target was streamed through before (another ``--slot``) that still exist: each
    retains WAL on the source until dropped, and nothing reads it now."""
    for other in duck.checkpoint_slots():
        if other != slot and replication.slot_info(control, other) is not None:
            log.warning(
                "replication slot %s, which this target was streamed through before, still exists and retains WAL "
                "on the source: drop it if nothing else uses it (SELECT pg_drop_replication_slot('%s'))",
                other, other.replace("'", "''"),
            )


def _reconnect(dsn: str, old: connecting.Connection, stop: threading.Event) -> connecting.Connection:
    """A fresh control connection, retrying until the source answers or ``stop`` is set."""
    try:
        old.close()
    except psycopg2.Error:
        pass
    delay = 0.5
    while True:
        try:
            return connecting.connect(dsn)
        except errors.SourceError as exc:
            log.warning("source still unreachable: %s", exc.message)
            if stop.wait(delay):
                raise
            delay = min(delay * 2, 30.0)
