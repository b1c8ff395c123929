"""ConsistencyCheck controller, basic: row counts of each table, source against copy.

What a run does (on create and on every spec change): for each SyncTable named in
``spec.tables`` it counts the source rows (``count(*)`` in PostgreSQL) and takes the copy's
count from the SyncTable status the writer reports (``status.rows``). The DuckDB file cannot
be opened by a second process while the writer holds it (DESIGN.md §5), so the operator reads
what the writer published instead of the file.

Score: the percentage of checked tables whose counts match (100 when all do); ``consistent``
is true when every table matches; the ``Consistent`` condition is true when the score reaches
the policy's ``alerts.consistencyScoreThreshold`` (what alerts act on).

Limits of this basic version (the full suite is a later issue): only ``row_count`` runs (other
check types are reported as not run); the two counts are not taken at one LSN, so a table
with writes in flight can differ by the rows changed meanwhile — a run waits until every
table is Ready and, on a mismatch, re-reads the counts once after the writer's next status
update before it reports one; ``schedule`` and ``repair`` are not acted on yet.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import kopf
import psycopg

from datasync import errors, identifiers, kube
from datasync.api import GROUP, VERSION, ConsistencyCheck, SyncPolicy, SyncTable
from datasync.api.conditions import COMPLETE, CONSISTENT, READY
from datasync.controllers import sources, statuses, syncpolicies
from datasync.engine import pgoutput

PLURAL = "consistencychecks"
RECHECK_SECONDS = 3.0


class NotReady(Exception):
    """A table cannot be compared yet (missing, not snapshotted)."""


def _table(client: kube.Kube, namespace: str, name: str, policy: str) -> SyncTable:
    obj = client.get(kube.path(f"{GROUP}/{VERSION}", "synctables", namespace, name))
    if obj is None:
        raise NotReady(f"SyncTable {name} does not exist")
    table = SyncTable.model_validate(obj)
    if table.spec.policy_ref.name != policy:
        raise NotReady(f"SyncTable {name} belongs to policy {table.spec.policy_ref.name}, not {policy}")
    if not statuses.is_true(obj.get("status"), READY) or table.status is None or table.status.rows is None:
        raise NotReady(f"SyncTable {name} is not Ready yet")
    return table


def _source_counts(conn: psycopg.Connection[Any], tables: list[SyncTable]) -> tuple[dict[str, int], str]:
    counts = {}
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for t in tables:
            name = identifiers.TableName(t.spec.source.schema_name, t.spec.source.table)
            row = conn.execute(f"SELECT count(*) FROM {name.sql}").fetchone()
            counts[t.metadata.name or ""] = int(row[0]) if row else 0
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    lsn = pgoutput.format_lsn(pgoutput.parse_lsn(row[0])) if row else "0/0"
    return counts, lsn


def compare(client: kube.Kube, policy: SyncPolicy, check: ConsistencyCheck) -> tuple[list[dict[str, Any]], str]:
    """Per-table results (TableResult JSON) and the source LSN of the counts."""
    namespace = check.metadata.namespace or ""
    names = list(check.spec.tables)
    tables = [_table(client, namespace, n, policy.metadata.name or "") for n in names]
    with sources.connect(client, policy) as conn:
        counts, lsn = _source_counts(conn, tables)
        targets = {t.metadata.name or "": int(t.status.rows or 0) if t.status else 0 for t in tables}
        if any(counts[n] != targets[n] for n in names):
            time.sleep(RECHECK_SECONDS)  # let the writer publish its next count, then look again
            tables = [_table(client, namespace, n, policy.metadata.name or "") for n in names]
            counts, lsn = _source_counts(conn, tables)
            targets = {t.metadata.name or "": int(t.status.rows or 0) if t.status else 0 for t in tables}
    results = []
    for n in names:
        ok = counts[n] == targets[n]
        check_result: dict[str, Any] = {"type": "row_count", "ok": ok}
        if not ok:
            check_result["message"] = f"source has {counts[n]} rows, the copy {targets[n]}"
        results.append(
            {
                "table": n,
                "ok": ok,
                "rowCountSource": counts[n],
                "rowCountTarget": targets[n],
                "mismatches": abs(counts[n] - targets[n]),
                "checks": [check_result],
            }
        )
    return results, lsn


def run(client: kube.Kube, body: Any) -> dict[str, Any]:
    """One run; writes and returns the status. Raises kopf.TemporaryError while tables are not ready."""
    check = ConsistencyCheck.model_validate(dict(body))
    namespace, name = check.metadata.namespace or "", check.metadata.name or ""
    generation = check.metadata.generation
    current = dict(body.get("status") or {})
    started = datetime.now(UTC).replace(microsecond=0)
    t0 = time.monotonic()

    def fail(phase: str, reason: str, message: str) -> dict[str, Any]:
        status = {
            "phase": phase,
            "observedGeneration": generation,
            "message": message,
            "conditions": statuses.with_conditions(
                current, [(COMPLETE, "False", reason, message), (READY, "False", reason, message)], generation
            ),
        }
        statuses.patch(client, PLURAL, namespace, name, status)
        return status

    policy = syncpolicies.get_policy(client, namespace, check.spec.policy_ref.name)
    if policy is None:
        fail("Pending", "PolicyNotFound", f"SyncPolicy {check.spec.policy_ref.name} does not exist")
        raise kopf.TemporaryError("policy not found", delay=10)
    try:
        results, lsn = compare(client, policy, check)
    except NotReady as exc:
        fail("Pending", "TablesNotReady", str(exc))
        raise kopf.TemporaryError(str(exc), delay=5) from None
    except sources.SourceProblem as exc:
        fail("Pending", exc.reason, exc.message)
        raise kopf.TemporaryError(exc.message, delay=15) from None
    except (errors.SourceError, psycopg.Error) as exc:
        message = sources.describe(exc) if isinstance(exc, errors.SourceError) else str(exc).strip()
        fail("Failed", "SourceError", message)
        raise kopf.TemporaryError(message, delay=30) from None

    passed = sum(1 for r in results if r["ok"])
    score = round(100.0 * passed / len(results), 2) if results else 100.0
    consistent = passed == len(results)
    threshold = policy.spec.alerts.consistency_score_threshold
    skipped = [c for c in check.spec.checks if c != "row_count"]
    summary = f"{passed}/{len(results)} table(s) have matching row counts (score {score:g})"
    if skipped:
        summary += f"; not run yet: {', '.join(skipped)}"
    duration = round(time.monotonic() - t0, 3)
    entry = {
        "time": started.isoformat(),
        "score": score,
        "consistent": consistent,
        "mismatches": sum(int(r["mismatches"]) for r in results),
        "lsn": lsn,
        "durationSeconds": duration,
    }
    history = [entry, *(current.get("history") or [])][: check.spec.history_limit]
    status = {
        "phase": "Complete",
        "observedGeneration": generation,
        "score": score,
        "consistent": consistent,
        "lastRun": started.isoformat(),
        "lsn": lsn,
        "durationSeconds": duration,
        "tables": results,
        "history": history,
        "message": summary,
        "conditions": statuses.with_conditions(
            current,
            [
                (COMPLETE, "True", "RunFinished", summary),
                (
                    CONSISTENT,
                    "True" if score >= threshold else "False",
                    "ScoreAboveThreshold" if score >= threshold else "ScoreBelowThreshold",
                    f"score {score:g}, threshold {threshold:g}",
                ),
                (READY, "True", "RunFinished", summary),
            ],
            generation,
        ),
    }
    statuses.patch(client, PLURAL, namespace, name, status)
    return status


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    status = run(kube.shared(), body)
    logger.info("consistency check finished: score %s", status.get("score"))
