"""When the writer runs a ConsistencyCheck, and what its metrics say."""

from __future__ import annotations

import datetime as dt
from typing import Any

from datasync.validation import comparing, rules
from datasync.working import checks, metrics

NOW = dt.datetime(2026, 11, 29, 12, 0, 30, tzinfo=dt.UTC)


def obj(generation: int = 2, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "c", "generation": generation, "creationTimestamp": "2026-11-29T11:00:00Z",
                     "annotations": spec.pop("annotations", {})},
        "spec": {"policyRef": {"name": "p"}, "tables": ["t"], **spec},
        "status": status or {},
    }


def test_a_new_or_changed_spec_runs_once() -> None:
    assert checks.due(obj(), NOW) == "created"
    assert checks.due(obj(status={"observedGeneration": 1}), NOW) == "spec changed"
    assert checks.due(obj(status={"observedGeneration": 2}), NOW) is None


def test_the_run_annotation_asks_for_one_more_run() -> None:
    done = {"observedGeneration": 2, "runRequest": "1"}
    assert checks.due(obj(status=done, annotations={checks.RUN_ANNOTATION: "1"}), NOW) is None
    assert checks.due(obj(status=done, annotations={checks.RUN_ANNOTATION: "2"}), NOW) == f"{checks.RUN_ANNOTATION}=2"


def test_schedule_suspend_and_deletion() -> None:
    status = {"observedGeneration": 2, "lastRun": "2026-11-29T11:30:00+00:00", "nextRun": "2026-11-29T12:00:00+00:00"}
    assert checks.due(obj(status=status, schedule="*/30 * * * *"), NOW) == "scheduled"
    later = {**status, "nextRun": "2026-11-29T12:30:00+00:00"}
    assert checks.due(obj(status=later, schedule="*/30 * * * *"), NOW) is None
    # no nextRun yet: computed from the last run
    assert checks.due(obj(status={"observedGeneration": 2, "lastRun": "2026-11-29T12:00:10+00:00"},
                          schedule="@hourly"), NOW) is None
    assert checks.due(obj(status={"observedGeneration": 2, "lastRun": "2026-11-29T11:59:00+00:00"},
                          schedule="@hourly"), NOW) == "scheduled"
    assert checks.due(obj(suspend=True), NOW) is None
    gone = obj()
    gone["metadata"]["deletionTimestamp"] = "2026-11-29T12:00:00Z"
    assert checks.due(gone, NOW) is None


def test_metrics_carry_results_and_forget_deleted_checks() -> None:
    m = metrics.Metrics("ns", "p")
    table = comparing.TableReport("public.orders", ok=False, rows_source=100, rows_target=99, missing=1)
    table.checks = {"data_hash": False}
    run = comparing.Run([table], [rules.RuleReport("r", True, 0)], 1234, NOW, duration=0.5)
    m.observe("nightly", run, {"public.orders": "orders"})
    text = m.exposition().decode()
    assert 'datasync_consistency_score{check="nightly",namespace="ns"} 99.0' in text
    assert 'datasync_consistency_mismatched_rows{check="nightly",namespace="ns",table="orders"} 1.0' in text
    assert 'datasync_consistency_runs_total{check="nightly",namespace="ns",result="inconsistent"} 1.0' in text
    (stamp,) = [line for line in text.splitlines() if line.startswith("datasync_consistency_last_success_timestamp")]
    assert float(stamp.split()[-1]) == NOW.timestamp()
    assert 'datasync_consistency_check_duration_seconds_count{check="nightly",namespace="ns"} 1.0' in text
    m.forget("nightly")
    assert 'check="nightly"' not in m.exposition().decode()
