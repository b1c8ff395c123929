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


class FakeKube:
    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects

    def get(self, path: str) -> dict[str, Any] | None:
        return self.objects.get(path.rsplit("/", 1)[-1])


def synctable(name: str, table: str, policy: str = "p", ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "datasync.dev/v1alpha1", "kind": "SyncTable",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"policyRef": {"name": policy}, "source": {"schema": "sales", "table": table}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "X",
                                   "message": "", "lastTransitionTime": "2026-11-29T00:00:00Z"}]},
    }


def test_declared_foreign_keys_map_synctables_to_source_tables() -> None:
    from datasync.api import ConsistencyCheck

    kube = FakeKube({"orders": synctable("orders", "Orders"), "customers": synctable("customers", "customers"),
                     "other": synctable("other", "x", policy="q"), "cold": synctable("cold", "c", ready=False)})
    runner = checks.Checks(kube, "ns", "p", "dsn", None, metrics.Metrics("ns", "p"))  # type: ignore[arg-type]
    check = ConsistencyCheck.model_validate({
        "apiVersion": "datasync.dev/v1alpha1", "kind": "ConsistencyCheck", "metadata": {"name": "c", "namespace": "ns"},
        "spec": {"policyRef": {"name": "p"}, "tables": ["orders"], "checks": ["referential_integrity"],
                 "foreignKeys": [{"name": "fk", "table": "orders", "columns": ["customer_id"],
                                  "references": {"table": "customers", "columns": ["id"]}}]},
    })
    (fk,) = runner._foreign_keys(check)
    assert (str(fk.child), fk.columns, str(fk.parent), fk.parent_columns) == (
        'sales."Orders"', ("customer_id",), "sales.customers", ("id",))
    assert runner._tables(check) == {"orders": fk.child}
    for name, why in (("other", "belongs to another policy"), ("cold", "not Ready"), ("gone", "does not exist")):
        try:
            runner._source_of(name)
        except checks.NotReady as exc:
            assert why in str(exc)
        else:
            raise AssertionError(name)
