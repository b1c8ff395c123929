"""Running a consistency check: aligned while the stream runs, repair, re-check.

Two entry points share one procedure:

* :func:`run_aligned` — inside a writer that is streaming (the operator's worker, or the
  stream :func:`check_file` starts): both sides are read at one LSN
  (``validation.aligning``), so live traffic is never reported as a divergence;
* :func:`check_file` — ``datasync check`` on a target file no process holds: it opens the
  file, resumes the target's own replication slot in a background stream (the copy catches
  up exactly as ``datasync sync`` would) and runs :func:`run_aligned` against it.  Without
  the slot at the source it compares the file as it stands and says so.

Repair re-copies only the rows found different: each table's keys are read from a fresh
source snapshot and written by the writer pinned at that snapshot (safe while CDC runs);
then the whole check runs again and the report shows what was repaired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import duckdb
import psycopg

from datasync import errors, identifiers
from datasync.engine import pinning, streaming
from datasync.sources import connecting, replication
from datasync.targets import duckfile
from datasync.validation import aligning, comparing, references, rules

log = logging.getLogger(__name__)

MEMORY_LIMIT = "256MB"  # DuckDB's buffer pool while checking a file (the scan streams; caching it all buys nothing)


@dataclasses.dataclass
class Request:
    tables: list[identifiers.TableName]  # empty: every table the target holds
    checks: list[str]
    rules: list[rules.Rule] = dataclasses.field(default_factory=list)
    repair: bool = False
    foreign_keys: list[references.ForeignKey] = dataclasses.field(default_factory=list)  # besides the catalog's
    timeout: float | None = None  # seconds the whole run may take (None: no limit)

    def validate(self) -> None:
        unknown = [c for c in self.checks if c not in comparing.CHECKS]
        if unknown:
            raise errors.DataSyncError(
                f"unknown check(s) {', '.join(unknown)}", f"choose from {', '.join(comparing.CHECKS)}"
            )
        if not self.checks:
            raise errors.DataSyncError("no check to run", f"choose from {', '.join(comparing.CHECKS)}")
        if self.rules and "business_rules" not in self.checks:
            self.checks.append("business_rules")
        if "business_rules" in self.checks and not self.rules:
            raise errors.DataSyncError("business_rules needs at least one rule", "pass --rule NAME=SELECT ...")
        for rule in self.rules:
            rules.validate(rule)
        if self.foreign_keys and "referential_integrity" not in self.checks:
            self.checks.append("referential_integrity")


def _names(request: Request, states: dict[identifiers.TableName, duckfile.TableState]) -> list[identifiers.TableName]:
    names = request.tables or sorted(states, key=str)
    missing = [str(n) for n in names if n not in states]
    if missing:
        raise errors.DataSyncError(f"{', '.join(missing)} not synced into this target", "sync the table first, or fix its name")
    not_ready = [str(n) for n in names if states[n].state != "streaming"]
    if not_ready:
        raise errors.DataSyncError(f"{', '.join(not_ready)} still being snapshotted", "check again once the snapshot is done")
    return names


class _Deadline:
    """Cancels both sides' queries when the run's time is up (PostgreSQL cancel, DuckDB interrupt)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout
        self.expired = threading.Event()

    def remaining(self) -> float:
        if self.at is None:
            return 600.0
        left = self.at - time.monotonic()
        if left <= 0:
            self.expire()
        return max(left, 0.001)

    def expire(self) -> None:
        self.expired.set()
        raise errors.DataSyncError(
            f"the check did not finish within {self.timeout:g}s", "raise the timeout, or check fewer tables at a time"
        )

    @contextlib.contextmanager
    def guarding(self, a: aligning.Aligned) -> Iterator[None]:
        timer = None
        if self.at is not None:
            def cancel() -> None:
                self.expired.set()
                for cur in (a.duck, *a.extra):
                    cur.interrupt()
                a.pg.cancel_safe()

            timer = threading.Timer(self.remaining(), cancel)
            timer.daemon = True
            timer.start()
        try:
            yield
        except (duckdb.Error, psycopg.Error, OSError):  # OSError: pyarrow's reader reports DuckDB's interrupt
            if self.expired.is_set():
                self.expire()
            raise
        finally:
            if timer is not None:
                timer.cancel()


def _check_aligned(
    dsn: str, pins: pinning.Pins, request: Request, deadline: _Deadline | None = None
) -> tuple[comparing.Run, dict[identifiers.TableName, duckfile.TableState]]:
    started = dt.datetime.now(dt.UTC)
    deadline = deadline or _Deadline(None)
    try:
        return _compare_aligned(dsn, pins, request, deadline, started)
    except errors.DataSyncError:
        if deadline.at is not None and time.monotonic() >= deadline.at:
            deadline.expire()  # e.g. the wait for the writer ran out: say it the same way
        raise


def _compare_aligned(
    dsn: str, pins: pinning.Pins, request: Request, deadline: _Deadline, started: dt.datetime
) -> tuple[comparing.Run, dict[identifiers.TableName, duckfile.TableState]]:
    with aligning.aligned(dsn, pins, deadline.remaining()) as a, deadline.guarding(a):
        states = duckfile.DuckTarget.read_states(a.duck)  # the table set as of the pinned position
        names = _names(request, states)
        missing = sorted({str(t) for k in request.foreign_keys for t in (k.child, k.parent) if t not in states})
        if missing:
            raise errors.DataSyncError(
                f"declared foreign keys name {', '.join(missing)}, not synced into this target", "sync them or fix the names"
            )
        tables, done = comparing.check_all(
            a.pg, a.duck, states, names, request.checks, request.rules, request.foreign_keys, a.extra
        )
        lsn = a.lsn
    return comparing.Run(tables, done, lsn, started), states


def _repair(
    dsn: str, pins: pinning.Pins, run: comparing.Run, states: dict[identifiers.TableName, duckfile.TableState]
) -> dict[str, int]:
    repaired: dict[str, int] = {}
    bad = [t for t in run.tables if t.mismatches]
    if any(not t._keys for t in bad):  # only counts were compared: locate the rows first
        names = [identifiers.TableName.parse(t.table) for t in bad]
        located, states = _check_aligned(dsn, pins, Request(names, ["data_hash"]))
        bad = located.tables
    for table in bad:
        if not table._keys:
            continue
        name = identifiers.TableName.parse(table.table)
        keys = table._keys

        state = states[name]  # the layout the check saw (a schema change since makes the write fail, not lie)

        def read(pg: psycopg.Connection[Any], state: duckfile.TableState = state, keys: list[Any] = keys) -> bytes:
            return comparing.fetch_rows(pg, state, keys)

        def write(target: duckfile.DuckTarget, rows: bytes, state: duckfile.TableState = state,
                  keys: list[Any] = keys) -> int:
            return comparing.write_rows(target.con, state, keys, rows)

        repaired[table.table] = int(aligning.write_pinned(dsn, pins, read, write))
        log.info("repaired %d row(s) of %s", repaired[table.table], table.table)
    return repaired


def run_aligned(dsn: str, pins: pinning.Pins, request: Request) -> comparing.Run:
    """The whole check (and repair) against a streaming writer serving ``pins``."""
    request.validate()
    t0 = time.monotonic()
    deadline = _Deadline(request.timeout)
    run, states = _check_aligned(dsn, pins, request, deadline)
    if request.repair and not run.ok:
        repaired = _repair(dsn, pins, run, states)
        if repaired:
            first = run
            run, _ = _check_aligned(dsn, pins, request, deadline)
            run.started = first.started
            for t in run.tables:
                t.repaired = repaired.get(t.table, 0)
            run.note = f"repaired {sum(repaired.values())} row(s); the results are from the re-check"
    run.duration = time.monotonic() - t0
    return run


def _open_target(path: str) -> None:
    """Fail clearly before anything is written: held by another process, or not a DataSync target."""
    try:
        con = duckdb.connect(path, read_only=True)
    except duckdb.Error as exc:
        raise errors.TargetError(
            f"cannot open DuckDB target {path}: {str(exc).splitlines()[0]}",
            "a running `datasync sync` holds the file; stop it, or check through the writer (a ConsistencyCheck "
            "resource when the operator runs it)",
        ) from None
    try:
        try:
            duckfile.DuckTarget.read_states(con)
        except duckdb.CatalogException:
            raise errors.TargetError(
                f"{path} is not a DataSync target (no _datasync schema)", "point --target at a file `datasync sync` wrote"
            ) from None
    finally:
        con.close()


def check_file(
    source: str, path: str, request: Request, *, slot: str | None = None, publication: str | None = None
) -> comparing.Run:
    """``datasync check``: see the module docstring."""
    request.validate()
    _open_target(path)
    slot = slot or replication.derive_name(path)
    publication = publication or slot
    target = duckfile.DuckTarget(path, memory_limit=MEMORY_LIMIT)
    try:
        with connecting.connect_psycopg3(source) as control:
            if replication.slot_info(control, slot) is None:
                return _check_as_is(source, target, request, slot)
            pins = pinning.Pins()
            stop = threading.Event()
            stream = streaming.ChangeStream(
                dsn=source, control=control, target=target, slot=slot, publication=publication,
                states=target.table_states(), pins=pins,
            )
            failure: list[BaseException] = []

            def follow() -> None:
                try:
                    stream.run(None, stop)
                except BaseException as exc:  # reported to the caller below
                    failure.append(exc)
                    pins.close()

            thread = threading.Thread(target=follow, name="check-stream", daemon=True)
            thread.start()
            try:
                while not pins.wait_serving(0.2):
                    if not thread.is_alive():
                        raise failure[0] if failure else errors.SourceError("the change stream ended")
                return run_aligned(source, pins, request)
            except pinning.NotStreaming:
                if failure:
                    raise failure[0] from None
                raise
            finally:
                stop.set()
                thread.join()
    finally:
        target.close()


def _check_as_is(source: str, target: duckfile.DuckTarget, request: Request, slot: str) -> comparing.Run:
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    states = target.table_states()
    names = _names(request, states)
    with connecting.connect_psycopg3(source, autocommit=False) as pg:
        pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        tables, done = comparing.check_all(
            pg, target.con, states, names, request.checks, request.rules, request.foreign_keys
        )
        pg.rollback()
        if request.repair:
            for name, t in zip(names, tables, strict=True):
                if t.mismatches and not t._keys:  # only counts were compared: locate the rows first
                    t._keys = comparing.compare_table(pg, target.con, states[name], ["data_hash"])._keys
            fixed = {t.table: comparing.repair(pg, target.con, states[name], t._keys)
                     for name, t in zip(names, tables, strict=True) if t._keys}
            if fixed:
                tables, done = comparing.check_all(
                    pg, target.con, states, names, request.checks, request.rules, request.foreign_keys
                )
                for t in tables:
                    t.repaired = fixed.get(t.table, 0)
    run = comparing.Run(tables, done, None, started, time.monotonic() - t0)
    run.note = (f"slot {slot} does not exist at the source, so the copy could not be brought to the source's position: "
                "compared as it stands (rows changed at the source since it was written count as differences)")
    return run
