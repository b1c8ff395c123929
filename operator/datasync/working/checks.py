"""ConsistencyChecks run by the writer that owns the copy.

The DuckDB file belongs to this process, so the checks of the policy's ConsistencyChecks run
here, against the running engine: both sides pinned at one LSN (``validation.aligning``), so
changes streaming meanwhile are never mistaken for divergences, and repairs written by the
writer itself at an exact position.

A run is due when the spec changed since the last run (``status.observedGeneration``), when
the ``datasync.dev/run`` annotation has a value the status has not answered yet, or when the
schedule's next time (``status.nextRun``) has come.  Runs go one at a time in a background
thread, so the control loop keeps publishing table status during a long check.  A run that
cannot start (tables not Ready yet, engine restarting) leaves the check ``Pending`` and is
tried again a few seconds later; a run that fails is ``Failed`` with the reason and retried
with a back-off.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from typing import Any

from datasync import errors, identifiers, kube, schedules
from datasync.api import GROUP, VERSION, ConsistencyCheck, SyncPolicy, SyncTable
from datasync.api.conditions import COMPLETE, CONSISTENT, READY
from datasync.controllers import statuses
from datasync.engine import pgoutput, pinning
from datasync.validation import comparing, references, rules, running
from datasync.working import metrics

log = logging.getLogger(__name__)

PLURAL = "consistencychecks"
RUN_ANNOTATION = f"{GROUP}/run"
RETRY_PENDING = 5.0
RETRY_FAILED = (30.0, 600.0)


class NotReady(Exception):
    """A table of the check cannot be compared yet."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _parse_time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def due(obj: dict[str, Any], now: dt.datetime) -> str | None:
    """Why ``obj`` should run now, or None."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp") or spec.get("suspend"):
        return None
    if status.get("observedGeneration") != meta.get("generation"):
        return "spec changed" if status.get("observedGeneration") else "created"
    request = (meta.get("annotations") or {}).get(RUN_ANNOTATION)
    if request and request != status.get("runRequest"):
        return f"{RUN_ANNOTATION}={request}"
    if spec.get("schedule"):
        next_run = _parse_time(status.get("nextRun"))
        if next_run is None:
            last = _parse_time(status.get("lastRun")) or _parse_time(meta.get("creationTimestamp")) or now
            next_run = schedules.next_run(spec["schedule"], last)
        if now >= next_run:
            return "scheduled"
    return None


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else json.dumps(key, default=str)


class Checks:
    """The policy's ConsistencyChecks, run one at a time in a thread."""

    def __init__(self, client: kube.Kube, namespace: str, policy: str, dsn: str, pins: pinning.Pins,
                 metrics_: metrics.Metrics) -> None:
        self.client, self.namespace, self.policy, self.dsn = client, namespace, policy, dsn
        self.pins = pins
        self.metrics = metrics_
        self.thread: threading.Thread | None = None
        self.not_before: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.known: set[str] = set()

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def tick(self, policy: SyncPolicy | None, threshold: float = 100.0) -> None:
        """Start the next due run, if none is running."""
        items = [o for o in self.client.list(kube.path(f"{GROUP}/{VERSION}", PLURAL, self.namespace))
                 if ((o.get("spec") or {}).get("policyRef") or {}).get("name") == self.policy]
        names = {o["metadata"]["name"] for o in items}
        for gone in self.known - names:
            self.metrics.forget(gone)
        self.known = names
        if self.busy or policy is None:
            return
        now = _now()
        for obj in sorted(items, key=lambda o: o["metadata"]["name"]):
            name = obj["metadata"]["name"]
            if time.monotonic() < self.not_before.get(name, 0.0):
                continue
            try:
                why = due(obj, now)
            except schedules.ScheduleError as exc:
                self._patch(obj, {"phase": "Failed", "message": str(exc)})
                continue
            if why is None:
                continue
            log.info("consistency check %s: run (%s)", name, why)
            self.thread = threading.Thread(target=self._run, args=(obj, policy, threshold), name=f"check-{name}",
                                           daemon=True)
            self.thread.start()
            return

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ one run
    def _patch(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        statuses.patch(self.client, PLURAL, self.namespace, obj["metadata"]["name"], status)

    def _source_of(self, name: str) -> identifiers.TableName:
        """The source table of SyncTable ``name``, which must be Ready in this policy."""
        obj = self.client.get(kube.path(f"{GROUP}/{VERSION}", "synctables", self.namespace, name))
        if obj is None:
            raise NotReady(f"SyncTable {name} does not exist")
        spec = obj.get("spec") or {}
        if (spec.get("policyRef") or {}).get("name") != self.policy:
            raise NotReady(f"SyncTable {name} belongs to another policy, not {self.policy}")
        if not statuses.is_true(obj.get("status"), READY):
            raise NotReady(f"SyncTable {name} is not Ready yet")
        source = SyncTable.model_validate(obj).spec.source
        return identifiers.TableName(source.schema_name, source.table)

    def _tables(self, check: ConsistencyCheck) -> dict[str, identifiers.TableName]:
        """SyncTable name → source table, each Ready in this policy."""
        return {name: self._source_of(name) for name in check.spec.tables}

    def _foreign_keys(self, check: ConsistencyCheck) -> list[references.ForeignKey]:
        return [
            references.ForeignKey(k.name, self._source_of(k.table), tuple(k.columns),
                                  self._source_of(k.references.table), tuple(k.references.columns))
            for k in check.spec.foreign_keys or []
        ]

    def _run(self, obj: dict[str, Any], policy: SyncPolicy, threshold: float) -> None:
        name = obj["metadata"]["name"]
        generation = obj["metadata"].get("generation")
        current = dict(obj.get("status") or {})
        request_id = (obj["metadata"].get("annotations") or {}).get(RUN_ANNOTATION)
        try:
            check = ConsistencyCheck.model_validate(obj)
            tables = self._tables(check)
            request = running.Request(
                list(tables.values()), list(check.spec.checks),
                [rules.Rule(r.name, r.sql, r.compare_with_source, r.description) for r in check.spec.rules or []],
                check.spec.repair,
                self._foreign_keys(check),
                timeout=float(check.spec.timeout_seconds),
            )
            self._patch(obj, {
                "phase": "Running",
                "message": f"comparing {len(tables)} table(s) at one LSN",
                "conditions": statuses.with_conditions(current, [(COMPLETE, "False", "Running", "a run is in progress")],
                                                       generation),
            })
            run = running.run_aligned(self.dsn, self.pins, request)
        except (NotReady, pinning.NotStreaming) as exc:
            message = exc.message if isinstance(exc, errors.DataSyncError) else str(exc)
            self.not_before[name] = time.monotonic() + RETRY_PENDING
            self._patch(obj, {
                "phase": "Pending", "message": message,
                "conditions": statuses.with_conditions(
                    current, [(COMPLETE, "False", "TablesNotReady", message), (READY, "False", "TablesNotReady", message)],
                    generation),
            })
            return
        except Exception as exc:  # reported in status, retried with a back-off
            message = f"{exc.message} (hint: {exc.hint})" if isinstance(exc, errors.DataSyncError) and exc.hint else (
                exc.message if isinstance(exc, errors.DataSyncError) else f"{type(exc).__name__}: {exc}".strip())
            if not isinstance(exc, errors.DataSyncError):
                log.exception("consistency check %s failed", name)
            n = self.failures[name] = self.failures.get(name, 0) + 1
            self.not_before[name] = time.monotonic() + min(RETRY_FAILED[0] * 2 ** (n - 1), RETRY_FAILED[1])
            self.metrics.failed(name)
            self._patch(obj, {
                "phase": "Failed", "message": message[:4096],
                "conditions": statuses.with_conditions(
                    current, [(COMPLETE, "False", "RunFailed", message), (READY, "False", "RunFailed", message)],
                    generation),
            })
            return
        self.failures.pop(name, None)
        self.not_before.pop(name, None)
        by_source = {str(src): n for n, src in tables.items()}
        self.metrics.observe(name, run, by_source)
        self._patch(obj, self._status(obj, check, run, by_source, threshold, request_id))

    def _status(self, obj: dict[str, Any], check: ConsistencyCheck, run: comparing.Run, by_source: dict[str, str],
                threshold: float, request_id: str | None) -> dict[str, Any]:
        generation = obj["metadata"].get("generation")
        current = dict(obj.get("status") or {})
        lsn = None if run.lsn is None else pgoutput.format_lsn(run.lsn)
        results = [self._table_result(t, by_source) for t in run.tables]
        rule_results = [
            {"name": r.name, "ok": r.ok, "violations": r.violations, "message": r.message[:1024],
             "sample": [json.dumps(s, default=str)[:1024] for s in r.sample[:10]] or None}
            for r in run.rules
        ]
        bad = sum(t.bad for t in run.tables) + sum(r.violations for r in run.rules)
        repaired = sum(t.repaired for t in run.tables)
        score = run.score
        summary = (f"score {score:g}: {bad} row(s) wrong in {len(run.tables)} table(s) at LSN {lsn}"
                   if not run.ok else f"score {score:g}: {len(run.tables)} table(s) identical at LSN {lsn}")
        if run.rules:
            summary += f"; {sum(r.ok for r in run.rules)}/{len(run.rules)} rule(s) hold"
        if repaired:
            summary += f"; {repaired} row(s) repaired before the re-check"
        started = run.started.replace(microsecond=0)
        entry = {"time": started.isoformat(), "score": score, "consistent": run.ok, "mismatches": bad, "lsn": lsn,
                 "durationSeconds": round(run.duration, 3), "repaired": repaired}
        status: dict[str, Any] = {
            "phase": "Complete",
            "observedGeneration": generation,
            "score": score,
            "consistent": run.ok,
            "lastRun": started.isoformat(),
            "nextRun": schedules.next_run(check.spec.schedule, started).isoformat() if check.spec.schedule else None,
            "lsn": lsn,
            "durationSeconds": round(run.duration, 3),
            "tables": results,
            "rules": rule_results or None,
            "history": [entry, *(current.get("history") or [])][: check.spec.history_limit],
            "message": summary,
            "runRequest": request_id,
            "conditions": statuses.with_conditions(current, [
                (COMPLETE, "True", "RunFinished", summary),
                (CONSISTENT, "True" if run.ok else "False",
                 "Identical" if run.ok else ("Diverged" if score >= threshold else "ScoreBelowThreshold"),
                 f"{summary}; alert threshold {threshold:g}"),
                (READY, "True", "RunFinished", summary),
            ], generation),
        }
        return status

    @staticmethod
    def _table_result(t: comparing.TableReport, by_source: dict[str, str]) -> dict[str, Any]:
        checks: list[dict[str, Any]] = []
        for kind, ok in t.checks.items():
            entry: dict[str, Any] = {"type": kind, "ok": ok}
            if not ok and kind == "row_count":
                entry["message"] = f"source has {t.rows_source} rows, the copy {t.rows_target}"
            elif not ok and kind == "data_hash":
                entry["message"] = f"{t.missing} missing, {t.extra} extra, {t.differing} different row(s)"
            elif not ok and kind == "referential_integrity":
                entry["message"] = "; ".join(
                    f"{fk['orphans']} row(s) reference no row of {fk['references']} ({fk['name']})"
                    for fk in t.foreign_keys if fk.get("orphans"))[:1024]
            checks.append(entry)
        result: dict[str, Any] = {
            "table": by_source.get(t.table, t.table),
            "sourceTable": t.table,
            "ok": t.ok,
            "score": t.score,
            "rowCountSource": t.rows_source,
            "rowCountTarget": t.rows_target,
            "mismatches": t.mismatches,
            "checks": checks,
        }
        if "data_hash" in t.checks:
            result.update(missing=t.missing, extra=t.extra, differing=t.differing)
        if "referential_integrity" in t.checks:
            result["orphans"] = t.orphans
        if t.mismatched_keys:
            result["mismatchedKeys"] = [_key_text(k)[:1024] for k in t.mismatched_keys[:100]]
        if t.repaired:
            result["repaired"] = t.repaired
        return result
