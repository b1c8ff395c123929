"""The writer's Prometheus metrics, served on ``/metrics`` beside the probes.

One registry per worker (not the process-global default), so tests can run several workers
in one process and every series carries the policy's namespace.  Consistency metrics are
set when a ConsistencyCheck run finishes; replication figures are read from the engine's
progress when Prometheus scrapes, so they are never staler than the last batch.
Secrets never reach a label: labels are resource names and table names only.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import core, registry
from prometheus_client.metrics import MetricWrapperBase

from datasync.validation import comparing
from datasync.working import reporting

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _Replication(registry.Collector):
    def __init__(self, progress: reporting.Progress, namespace: str, policy: str) -> None:
        self.progress, self.namespace, self.policy = progress, namespace, policy

    def collect(self) -> Iterator[core.Metric]:
        figures = self.progress.stream()
        labels = ["namespace", "policy"]
        values = [self.namespace, self.policy]
        lag_b = core.GaugeMetricFamily("datasync_replication_lag_bytes", "WAL the copy is behind the source.", labels=labels)
        lag_s = core.GaugeMetricFamily(
            "datasync_replication_lag_seconds", "Age of the latest applied commit when it was applied.", labels=labels
        )
        applied = core.GaugeMetricFamily(
            "datasync_applied_lsn", "Source WAL position applied to the copy (as a number).", labels=labels
        )
        if figures is not None:
            lag_b.add_metric(values, figures.lag_bytes)
            lag_s.add_metric(values, figures.lag_seconds or 0.0)
            applied.add_metric(values, figures.applied_lsn)
        yield from (lag_b, lag_s, applied)


class Metrics:
    def __init__(self, namespace: str, policy: str, progress: reporting.Progress | None = None) -> None:
        self.namespace = namespace
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        if progress is not None:
            self.registry.register(_Replication(progress, namespace, policy))
        check_labels = ["namespace", "check"]
        table_labels = ["namespace", "check", "table"]
        self.score = prometheus_client.Gauge(
            "datasync_consistency_score", "Consistency score of the latest run, in percent.", check_labels,
            registry=self.registry,
        )
        self.table_score = prometheus_client.Gauge(
            "datasync_consistency_table_score", "Consistency score of a table in the latest run, in percent.",
            table_labels, registry=self.registry,
        )
        self.mismatched = prometheus_client.Gauge(
            "datasync_consistency_mismatched_rows",
            "Rows found wrong in the latest run (missing, extra, different, or violating a foreign key).",
            table_labels, registry=self.registry,
        )
        self.duration = prometheus_client.Histogram(
            "datasync_consistency_check_duration_seconds", "How long check runs take.", check_labels,
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.last_success = prometheus_client.Gauge(
            "datasync_consistency_last_success_timestamp_seconds",
            "When the latest run that completed started (Unix time), consistent or not.", check_labels,
            registry=self.registry,
        )
        self.runs = prometheus_client.Counter(
            "datasync_consistency_runs", "Check runs by result: consistent, inconsistent, failed.",
            [*check_labels, "result"], registry=self.registry,
        )
        self.repaired = prometheus_client.Counter(
            "datasync_consistency_repaired_rows", "Rows re-copied by repair.", check_labels, registry=self.registry,
        )

    def observe(self, check: str, run: comparing.Run, tables: dict[str, str]) -> None:
        """Record a finished run; ``tables`` maps the report's table names to SyncTable names."""
        self.score.labels(self.namespace, check).set(run.score)
        for t in run.tables:
            name = tables.get(t.table, t.table)
            self.table_score.labels(self.namespace, check, name).set(t.score)
            self.mismatched.labels(self.namespace, check, name).set(t.bad)
            if t.repaired:
                self.repaired.labels(self.namespace, check).inc(t.repaired)
        self.duration.labels(self.namespace, check).observe(run.duration)
        self.last_success.labels(self.namespace, check).set(run.started.timestamp())
        self.runs.labels(self.namespace, check, "consistent" if run.ok else "inconsistent").inc()

    def failed(self, check: str) -> None:
        self.runs.labels(self.namespace, check, "failed").inc()

    def forget(self, check: str) -> None:
        """A deleted check leaves no series behind."""
        wrappers: tuple[MetricWrapperBase, ...] = (
            self.score, self.table_score, self.mismatched, self.duration, self.last_success, self.runs, self.repaired,
        )
        for metric in wrappers:
            for labels in list(metric._metrics):  # prometheus_client has no public listing of children
                if labels[:2] == (self.namespace, check):
                    metric.remove(*labels)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
