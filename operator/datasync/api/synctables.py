"""SyncTable: one PostgreSQL table copied to one target table, under a SyncPolicy.

One resource per table (rather than a list inside the policy) so that each table has its own
status, conditions and lifecycle: adding a table starts its snapshot, deleting it honours its
reclaimPolicy, and ``kubectl get synctables`` shows rows and lag per table.

Why ``source`` and ``policyRef`` are immutable: the target table's rows, the applied LSN and
the slot membership all belong to that source table in that policy. Pointing the resource
somewhere else would mix two tables' data; delete it and create a new one instead.

Modes: ``cdc`` snapshots once and then streams changes; ``batch`` re-copies the table on
``schedule`` (no slot involvement); ``hybrid`` streams changes and also re-copies on
``schedule`` to repair drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from datasync.api.common import (
    AGE_COLUMN,
    CONSISTENCY_HELP,
    READY_COLUMN_PATH,
    STRATEGY_HELP,
    ApiModel,
    ColumnNames,
    ConsistencyLevel,
    CrdInfo,
    Cron,
    Int64,
    Lsn,
    PolicyRef,
    PrinterColumn,
    Resource,
    Rule,
    SqlName,
    StatusModel,
    Strategy,
)
from datasync.api.conditions import Conditions

Mode = Literal["cdc", "batch", "hybrid"]
Phase = Literal["Pending", "Snapshotting", "Streaming", "Ready", "Degraded"]


class TableSource(ApiModel):
    """The PostgreSQL table to copy. Immutable."""

    __cel__ = (
        Rule(
            rule="self == oldSelf",
            message="source is immutable: delete this SyncTable and create a new one to copy another table",
            transition=lambda old, new: old == new,
        ),
    )

    schema_name: SqlName = Field(default="public", description="Schema of the source table, as in the catalog.")
    table: SqlName = Field(description="Name of the source table, as in the catalog (case-sensitive, no quoting).")


class TableTarget(ApiModel):
    """Where the copy goes in the target."""

    schema_name: SqlName | None = Field(
        default=None, description="Target schema; the source schema when unset (created if missing)."
    )
    table: SqlName | None = Field(default=None, description="Target table; the source table name when unset.")


class ColumnFilter(ApiModel):
    """Which columns to copy: all by default, only ``include``, or all but ``exclude``."""

    __cel__ = (
        Rule(
            rule="!has(self.include) || !has(self.exclude)",
            message="columns.include and columns.exclude are mutually exclusive: list the columns to copy or those to skip",
            check=lambda c: c.include is None or c.exclude is None,
        ),
    )

    include: ColumnNames | None = Field(default=None, min_length=1, description="Copy only these columns (key columns included).")
    exclude: ColumnNames | None = Field(default=None, min_length=1, description="Copy every column except these.")


class SyncTableSpec(ApiModel):
    """Desired state of a SyncTable."""

    __cel__ = (
        Rule(
            rule="self.mode == 'cdc' || has(self.schedule)",
            message='schedule is required when mode is batch or hybrid, e.g. "0 3 * * *"',
            check=lambda s: s.mode == "cdc" or s.schedule is not None,
            field_path=".schedule",
            reason="FieldValueRequired",
        ),
        Rule(
            rule="self.mode != 'cdc' || !has(self.schedule)",
            message="schedule applies to batch and hybrid modes only: remove it or change mode",
            check=lambda s: s.mode != "cdc" or s.schedule is None,
            field_path=".schedule",
            reason="FieldValueForbidden",
        ),
        Rule(
            rule=(
                "!has(self.key) || !has(self.columns) || !has(self.columns.exclude) || "
                "self.key.all(k, !(k in self.columns.exclude))"
            ),
            message="key columns cannot be excluded: remove them from columns.exclude",
            check=lambda s: not (s.key and s.columns and s.columns.exclude) or not set(s.key) & set(s.columns.exclude),
            field_path=".columns.exclude",
        ),
        Rule(
            rule=(
                "!has(self.key) || !has(self.columns) || !has(self.columns.include) || self.key.all(k, k in self.columns.include)"
            ),
            message="columns.include must list every key column",
            check=lambda s: not (s.key and s.columns and s.columns.include) or set(s.key) <= set(s.columns.include),
            field_path=".columns.include",
        ),
        Rule(
            rule="self.policyRef == oldSelf.policyRef",
            message="policyRef is immutable: delete this SyncTable and create it under the other SyncPolicy",
            transition=lambda old, new: old.policy_ref == new.policy_ref,
            field_path=".policyRef",
        ),
    )

    policy_ref: PolicyRef = Field(description="The SyncPolicy (source, target, slot) this table belongs to. Immutable.")
    source: TableSource = Field(description="The PostgreSQL table to copy. Immutable.")
    target: TableTarget | None = Field(default=None, description="Target schema and table; the source names when unset.")
    mode: Mode = Field(
        default="cdc",
        description=(
            "cdc: copy once, then stream changes; batch: re-copy the whole table on schedule; "
            "hybrid: stream changes and re-copy on schedule to repair drift."
        ),
    )
    key: ColumnNames | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Columns identifying a row; the source's primary key (or replica identity index) when unset.",
    )
    columns: ColumnFilter | None = Field(default=None, description="Column filter; every column when unset.")
    deletes: Literal["apply", "soft", "ignore"] = Field(
        default="apply",
        description=(
            "What a source DELETE does: apply deletes the row, soft keeps it and sets its _datasync_deleted_at column, "
            "ignore keeps it unchanged (an append-only copy)."
        ),
    )
    schedule: Cron | None = Field(
        default=None, description='When batch and hybrid modes re-copy the table, in cron syntax (UTC), e.g. "0 3 * * *".'
    )
    strategy: Strategy | None = Field(default=None, description=f"Overrides the policy's default strategy. {STRATEGY_HELP}")
    consistency_level: ConsistencyLevel | None = Field(
        default=None, description=f"Overrides the policy's default consistency level for dual-writes. {CONSISTENCY_HELP}"
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Overrides the policy's default batch size. One writer streams all of a policy's tables, "
        "so the smallest batchSize among them applies to all.",
    )
    reclaim_policy: Literal["retain", "delete"] = Field(
        default="retain",
        description="What happens to the target table when this SyncTable is deleted: retain keeps it, delete drops it.",
    )


class SyncTableStatus(StatusModel):
    """Observed state of a SyncTable, written by the operator."""

    conditions: Conditions | None = Field(default=None, description="Current state: Ready, Snapshotted.")
    observed_generation: Int64 | None = Field(default=None, description="metadata.generation this status was computed for.")
    phase: Phase | None = Field(default=None, description="Pending, Snapshotting, Streaming, Ready or Degraded.")
    target_table: str | None = Field(default=None, max_length=130, description="Resolved target as schema.table.")
    rows: Int64 | None = Field(default=None, description="Rows in the target table.")
    snapshot_rows: Int64 | None = Field(default=None, description="Rows copied by the latest snapshot (or batch copy).")
    last_applied_lsn: Lsn | None = Field(default=None, description="Commit LSN of the last change applied to the target.")
    lag_seconds: float | None = Field(default=None, ge=0, description="Age of the oldest change not yet applied, in seconds.")
    lag_bytes: Int64 | None = Field(
        default=None, description="WAL bytes between the source's current position and lastAppliedLSN."
    )
    last_sync_time: datetime | None = Field(default=None, description="When the last batch copy (batch, hybrid) finished.")
    next_sync_time: datetime | None = Field(default=None, description="When the next scheduled copy starts.")
    message: str | None = Field(default=None, max_length=4096, description="Human-readable detail about the phase.")


class SyncTable(Resource):
    """A PostgreSQL table kept in sync with a table in the policy's target."""

    kind: Literal["SyncTable"] = Field(default="SyncTable", description="Kind of the resource.")
    spec: SyncTableSpec = Field(description="Desired state.")
    status: SyncTableStatus | None = Field(default=None, description="Observed state, written by the operator.")


CRD = CrdInfo(
    kind="SyncTable",
    plural="synctables",
    singular="synctable",
    short_names=("st",),
    model=SyncTable,
    printer_columns=(
        PrinterColumn("Policy", "string", ".spec.policyRef.name", "The SyncPolicy of the table."),
        PrinterColumn("Source", "string", ".spec.source.table", "Source table.", priority=1),
        PrinterColumn("Mode", "string", ".spec.mode", "cdc, batch or hybrid."),
        PrinterColumn("Phase", "string", ".status.phase", "Summary of the state.", priority=1),
        PrinterColumn("Ready", "string", READY_COLUMN_PATH, "Status of the Ready condition."),
        PrinterColumn("Rows", "integer", ".status.rows", "Rows in the target table."),
        PrinterColumn("Lag", "number", ".status.lagSeconds", "Replication lag in seconds."),
        AGE_COLUMN,
    ),
)
