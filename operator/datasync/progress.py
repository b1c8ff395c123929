"""Terminal progress for long work: snapshot bars and a live CDC line (rich)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from datasync import identifiers
from datasync.engine import pgoutput, streaming


class RichReporter:
    """Per-table snapshot bars (rows, rows/s, ETA) and a CDC status line."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(compact=True),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[identifiers.TableName, TaskID] = {}
        self.started: dict[identifiers.TableName, float] = {}
        self.cdc_task: TaskID | None = None
        self._last_cdc = 0.0
        self.applied_lsn = 0

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def snapshot_started(self, table: identifiers.TableName, est_rows: int) -> None:
        self.started[table] = time.monotonic()
        self.tasks[table] = self.progress.add_task(str(table), total=max(est_rows, 1), rate="")

    def snapshot_rows(self, table: identifiers.TableName, rows: int) -> None:
        task = self.tasks[table]
        self.progress.advance(task, rows)
        done = self.progress.tasks[task].completed
        rate = done / max(time.monotonic() - self.started[table], 1e-6)
        total = self.progress.tasks[task].total or 0
        self.progress.update(task, rate=f"{rate:,.0f} rows/s", total=max(total, done))

    def snapshot_done(self, table: identifiers.TableName, rows: int, seconds: float) -> None:
        task = self.tasks[table]
        self.progress.update(task, total=rows, completed=rows, rate=f"{rows / max(seconds, 1e-6):,.0f} rows/s")

    def cdc_task_started(self) -> bool:
        return self.cdc_task is not None

    def batch(self, stats: streaming.Stats) -> None:
        self.applied_lsn = max(self.applied_lsn, stats.applied_lsn, stats.confirmed_lsn)
        now = time.monotonic()
        if self.cdc_task is None:
            self.cdc_task = self.progress.add_task("cdc", total=None, rate="")
        if now - self._last_cdc < 0.25:
            return
        self._last_cdc = now
        elapsed = max(now - stats.started, 1e-6)
        lag = "-" if stats.lag_seconds is None else f"{stats.lag_seconds:.2f}s"
        self.progress.update(
            self.cdc_task,
            description=f"cdc @ {pgoutput.format_lsn(stats.applied_lsn)}",
            completed=stats.changes,
            rate=f"{stats.changes / elapsed:,.0f} changes/s, {stats.transactions} txns, lag {lag}",
        )
