"""The writer's control loop: run the engine for the policy's tables, report, hand tables back.

Every ``poll`` seconds the loop reads the SyncPolicy and its SyncTables from the API and
works out the *plan*: the tables to run (with their generations), the target path and the
policy's generation. When the plan changes — a table added, changed or deleted — the engine
is stopped (it finishes the batch in flight and checkpoints), the target is put in order
and the engine starts again with the new set; tables already copied carry on from their
checkpoint, new ones are snapshotted. Restarting is how the set changes because the engine
reads its table set once, at start.

Putting the target in order happens only while the engine is stopped, as this process is
the file's only writer:

* a deleted SyncTable is *released*: its DuckDB table dropped when ``reclaimPolicy: delete``,
  kept otherwise, and in both cases forgotten by the engine; then ``Released=True`` in its
  status tells the operator's finalizer to go ahead (remove it from the publication, drop the
  slot with the last table);
* a table the target holds but no runnable SyncTable asks for is forgotten (data kept): the
  engine keeps syncing every table a target holds, so a table nobody asks for any more, or
  one that cannot run right now, would otherwise block the others.

Status is published from a separate read-only connection to the same DuckDB database (one
process, one database instance: DuckDB allows readers beside the writer there), at most
every ``publish`` seconds per table and only when something changed: phase, copied rows while
snapshotting, then row count, applied LSN and lag while streaming.

An engine failure (source gone, slot invalidated, ...) marks the tables ``Degraded`` with the
engine's message and is retried with a growing back-off (5 s up to 5 min).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import psycopg2

from datasync import errors, identifiers, kube
from datasync.api import GROUP, VERSION, SyncPolicy
from datasync.api.conditions import READY, SNAPSHOTTED
from datasync.controllers import naming, statuses
from datasync.engine import pgoutput, pinning, syncing
from datasync.sources import checking, connecting
from datasync.targets import duckfile
from datasync.working import checks, health, metrics, reporting, tables

log = logging.getLogger(__name__)

RELEASED = "Released"
API = f"{GROUP}/{VERSION}"
BACKOFF_MIN, BACKOFF_MAX = 5.0, 300.0
RECHECK_SECONDS = 30.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, errors.DataSyncError):
        return f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Engine:
    """One ``syncing.run(follow=True)`` in a thread."""

    def __init__(self, opts: syncing.Options, progress: reporting.Progress) -> None:
        self.opts = opts
        self.progress = progress
        self.stop = threading.Event()
        self.error: str | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            syncing.run(self.opts, self.progress, self.stop)
        except Exception as exc:  # any failure is reported in status and retried
            if not isinstance(exc, errors.DataSyncError):
                log.exception("engine failed")
            self.error = _describe(exc)
            log.warning("engine stopped: %s", self.error)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()


class Worker:
    def __init__(
        self,
        client: kube.Kube,
        namespace: str,
        policy: str,
        dsn: str,
        *,
        target_override: str | None = None,
        health_address: str = "0.0.0.0:8080",
        poll: float = 2.0,
        publish: float = 2.0,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.policy_name = policy
        self.dsn = dsn
        self.target_override = target_override
        self.health_address = health_address
        self.poll = poll
        self.publish_every = publish
        self.health = health.Health()
        self.progress = reporting.Progress()
        self.metrics = metrics.Metrics(namespace, policy, self.progress)
        self.pins = pinning.Pins()  # consistency checks pin the engine at exact positions
        self.checks = checks.Checks(client, namespace, policy, dsn, self.pins, self.metrics)
        self.engine: Engine | None = None
        self.plan: tuple[Any, ...] | None = None
        self.path: str | None = None
        self.reader: duckdb.DuckDBPyConnection | None = None
        self.control: connecting.Connection | None = None
        self.checked: dict[tuple[str, int], tuple[float, str | None]] = {}
        self.published: dict[str, tuple[float, dict[str, Any]]] = {}
        self.backoff = BACKOFF_MIN
        self.retry_at = 0.0
        self.source_problem: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event) -> int:
        server = health.serve(self.health, self.health_address, self.metrics.exposition)
        log.info("worker for SyncPolicy %s/%s, health on %s", self.namespace, self.policy_name, self.health_address)
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except kube.ApiError as exc:
                    log.warning("Kubernetes API: %s", exc)
                    self.health.tick(self.health.ready, f"API error: {exc.reason}")
                except Exception as exc:  # keep the writer alive; the probe reports a wedged loop
                    log.exception("control loop")
                    self.health.tick(False, _describe(exc))
                stop.wait(self.poll)
        finally:
            if not self._halt():
                log.error("the engine did not stop in time")
            self.checks.join(10.0)  # a check in flight ends once the engine stops serving pins
            server.shutdown()
            if self.reader is not None:
                self.reader.close()
            if self.control is not None:
                self.control.close()
        log.info("worker stopped")
        return 0

    def _halt(self, timeout: float = 120.0) -> bool:
        """Stop the engine (it finishes its batch and checkpoints); False while it is still busy."""
        if self.engine is not None:
            self.engine.stop.set()
            self.engine.thread.join(timeout)
            if self.engine.thread.is_alive():
                return False
            self.engine = None
        return True

    # ------------------------------------------------------------------ one pass
    def tick(self) -> None:
        obj = self.client.get(kube.path(API, "syncpolicies", self.namespace, self.policy_name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            # Never stream for a policy that is going away: its finalizer drops the slot, and the
            # engine would create it again (retaining WAL for nobody) before the pod is removed.
            self._halt(timeout=self.poll)
            self.plan = None
            state = "not found" if obj is None else "being deleted"
            self.health.tick(False, f"SyncPolicy {self.namespace}/{self.policy_name} {state}")
            return
        policy = SyncPolicy.model_validate(obj)
        path = self.target_override or policy.spec.target.duckdb_settings().path
        items = self.client.list(kube.path(API, "synctables", self.namespace))
        all_tables = [
            tables.wanted(t) for t in items if (t.get("spec") or {}).get("policyRef", {}).get("name") == self.policy_name
        ]
        releasing = [w for w in all_tables if w.deleting and not statuses.is_true(w.status, RELEASED)]
        candidates = [w for w in all_tables if not w.deleting and w.unsupported is None]
        problems = {w.name: self._check(w) for w in candidates}
        runnable = [w for w in candidates if problems[w.name] is None] if not policy.spec.suspend else []
        plan = (policy.metadata.generation, path, tuple(sorted(w.key for w in runnable)))

        now = time.monotonic()
        engine = self.engine
        failed = False
        if engine is not None and engine.running and now - engine.started > 60:
            self.backoff = BACKOFF_MIN  # it has been running fine for a while
        if engine is not None and not engine.running:
            if engine.error is None:
                self.plan = None  # ended without an error (should not happen in follow mode): start again
            else:
                failed = True
                if self.retry_at == 0.0:
                    self.retry_at = now + self.backoff
                    self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        if releasing or plan != self.plan or (failed and now >= self.retry_at):
            if not self._halt(timeout=self.poll):
                self.health.tick(True, "waiting for the engine to finish its snapshot or batch before changing tables")
                return
            self._open(path)
            for w in releasing:
                self._release(w)
            self._forget_others({w.source for w in runnable})
            if runnable:
                self._start(policy, path, runnable)
            self.plan = plan
            self.retry_at = 0.0
        self._publish([w for w in all_tables if not w.deleting], runnable, problems)
        self.checks.tick(policy, policy.spec.alerts.consistency_score_threshold)
        ready = not runnable or (self.engine is not None and self.engine.running)
        self.health.tick(ready, f"{len(runnable)} table(s) running" if ready else (self._engine_error() or "engine not running"))

    def _engine_error(self) -> str | None:
        return self.engine.error if self.engine is not None and not self.engine.running else None

    def _start(self, policy: SyncPolicy, path: str, runnable: list[tables.Wanted]) -> None:
        opts = syncing.Options(
            source=self.dsn,
            target=path,
            tables=[w.source.sql for w in runnable],
            follow=True,
            slot=naming.slot_name(policy),
            publication=naming.publication_name(policy),
            batch_changes=tables.batch_changes(policy.spec.defaults.batch_size, runnable),
            max_batch_seconds=policy.spec.defaults.max_batch_seconds,
            memory_limit=policy.spec.target.duckdb_settings().memory_limit or "1GB",
            pins=self.pins,
        )
        log.info("starting the engine for %s", ", ".join(str(w.source) for w in runnable))
        self.engine = Engine(opts, self.progress)

    # ------------------------------------------------------------------ source checks
    def _check(self, w: tables.Wanted) -> str | None:
        """None when the engine can run the table; else why not (rechecked every 30 s)."""
        cached = self.checked.get(w.key)
        if cached is not None and (cached[1] is None or time.monotonic() - cached[0] < RECHECK_SECONDS):
            return cached[1]
        try:
            if self.control is None or self.control.closed:
                self.control = connecting.connect(self.dsn)
            checking.check_tables(self.control, [w.source])
            problem = None
            self.source_problem = None
        except errors.SourceError as exc:
            problem = _describe(exc)
        except psycopg2.Error as exc:
            problem = _describe(exc)
            if self.control is not None:
                self.control.close()
                self.control = None
        self.checked[w.key] = (time.monotonic(), problem)
        return problem

    # ------------------------------------------------------------------ the target (engine stopped)
    def _open(self, path: str) -> None:
        if self.reader is not None and self.path == path:
            return
        if self.reader is not None:
            self.reader.close()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Creates the engine's metadata tables if the file is new, then stays open for reading.
        duckfile.DuckTarget(path).close()
        self.reader = duckdb.connect(path)
        self.path = path

    def _release(self, w: tables.Wanted) -> None:
        assert self.path is not None
        target = duckfile.DuckTarget(self.path)
        try:
            state = target.table_states().get(w.source)
            name = state.target if state is not None else w.source
            if w.reclaim_policy == "delete":
                target.con.execute(f"DROP TABLE IF EXISTS {name.sql}")
                what, reason = f"dropped DuckDB table {name}", "Dropped"
            else:
                what, reason = f"kept DuckDB table {name} (reclaimPolicy retain)", "Retained"
            target.forget_table(w.source)
        finally:
            target.close()
        log.info("released SyncTable %s: %s", w.name, what)
        conditions = statuses.with_conditions(w.status, [(RELEASED, "True", reason, what)], w.generation)
        statuses.patch(self.client, "synctables", self.namespace, w.name, {"conditions": conditions, "message": what})
        self.published.pop(w.name, None)

    def _forget_others(self, keep: set[identifiers.TableName]) -> None:
        assert self.path is not None
        target = duckfile.DuckTarget(self.path)
        try:
            for source in target.table_states():
                if source not in keep:
                    target.forget_table(source)
                    log.info("no runnable SyncTable asks for %s any more: stopped syncing it (data kept)", source)
        finally:
            target.close()

    # ------------------------------------------------------------------ status
    def _read_target(self) -> tuple[dict[identifiers.TableName, duckfile.TableState], int]:
        if self.reader is None:
            return {}, 0
        cur = self.reader.cursor()
        try:
            rows = cur.execute(
                "SELECT source_schema, source_table, target_schema, target_table, state, snapshot_lsn, rows_snapshotted "
                "FROM _datasync.tables"
            ).fetchall()
            states = {
                identifiers.TableName(s, t): duckfile.TableState(
                    identifiers.TableName(s, t), identifiers.TableName(ts, tt), state, int(lsn), [], [], int(n)
                )
                for s, t, ts, tt, state, lsn, n in rows
            }
            applied = 0
            if self.engine is not None:
                row = cur.execute(
                    "SELECT applied_lsn FROM _datasync.checkpoint WHERE slot = ?", [self.engine.opts.slot]
                ).fetchone()
                applied = int(row[0]) if row else 0
            return states, applied
        except duckdb.Error:
            return {}, 0
        finally:
            cur.close()

    def _count(self, name: identifiers.TableName) -> int | None:
        if self.reader is None:
            return None
        cur = self.reader.cursor()
        try:
            row = cur.execute(f"SELECT count(*) FROM {name.sql}").fetchone()
            return int(row[0]) if row else None
        except duckdb.Error:
            return None
        finally:
            cur.close()

    def _status_of(
        self,
        w: tables.Wanted,
        running: set[str],
        problem: str | None,
        states: dict[identifiers.TableName, duckfile.TableState],
        applied: int,
    ) -> dict[str, Any]:
        status: dict[str, Any] = {"observedGeneration": w.generation, "targetTable": str(w.source)}
        engine_error = self._engine_error()
        state = states.get(w.source)
        ready: tuple[Any, str, str]
        snapshotted: tuple[Any, str, str] | None = None
        if w.unsupported is not None:
            status["phase"] = "Degraded"
            ready = ("False", "Unsupported", w.unsupported)
        elif problem is not None:
            status["phase"] = "Degraded"
            ready = ("False", "SourceTableInvalid", problem)
        elif w.name not in running:
            status["phase"] = "Pending"
            ready = ("False", "Suspended", "the policy is suspended")
        elif engine_error is not None:
            status["phase"] = "Degraded"
            ready = ("False", "SyncFailed", f"{engine_error}; retrying")
        elif state is not None and state.state == "streaming":
            status["phase"] = "Streaming"
            status["targetTable"] = str(state.target)
            status["rows"] = self._count(state.target)
            status["snapshotRows"] = state.rows_snapshotted
            # Applied up to the stream's checkpoint, and at least up to the snapshot's consistent point.
            status["lastAppliedLSN"] = pgoutput.format_lsn(max(applied, state.snapshot_lsn))
            figures = self.progress.stream()
            if figures is not None:
                status["lagBytes"] = figures.lag_bytes
                status["lagSeconds"] = round(figures.lag_seconds or 0.0, 1)
            ready = ("True", "Streaming", "snapshot done; changes are applied as they commit")
            snapshotted = ("True", "SnapshotDone", f"{state.rows_snapshotted} rows copied")
        else:
            copied = self.progress.copied(w.source) or 0
            status["phase"] = "Snapshotting"
            status["snapshotRows"] = copied
            ready = ("False", "Snapshotting", f"copying the table: {copied} rows so far")
            snapshotted = ("False", "Snapshotting", f"{copied} rows copied so far")
        status["message"] = ready[2]
        updates = [(READY, *ready)]
        if snapshotted is not None:
            updates.append((SNAPSHOTTED, *snapshotted))
        status["conditions"] = statuses.with_conditions(w.status, updates, w.generation)  # type: ignore[arg-type]
        return status

    def _publish(self, live: list[tables.Wanted], runnable: list[tables.Wanted], problems: dict[str, str | None]) -> None:
        states, applied = self._read_target()
        running = {w.name for w in runnable}
        now = time.monotonic()
        for w in live:
            if problems.get(w.name) is not None:
                continue  # the operator's admission reports source-table problems (same checks)
            status = self._status_of(w, running, problems.get(w.name), states, applied)
            last = self.published.get(w.name)
            compact = {k: v for k, v in status.items() if v is not None}
            if last is not None and (last[1] == compact or now - last[0] < self.publish_every):
                continue
            # Fields this status no longer has are removed (merge patch: null deletes).
            previous = set(last[1]) if last is not None else set(w.status) - {"conditions"}
            for gone in previous - set(status):
                if gone in ("rows", "lagBytes", "lagSeconds", "lastAppliedLSN", "snapshotRows"):
                    status[gone] = None
            statuses.patch(self.client, "synctables", self.namespace, w.name, status)
            self.published[w.name] = (now, compact)


def target_override() -> str | None:
    """``DATASYNC_TARGET_PATH`` replaces the policy's path (running a writer outside its pod, e.g. in tests)."""
    return os.environ.get("DATASYNC_TARGET_PATH") or None
