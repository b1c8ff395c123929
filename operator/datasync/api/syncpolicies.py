"""SyncPolicy: one PostgreSQL source, one analytics target, and how to keep them in sync.

A policy owns what is shared by its tables: the publication and the logical replication slot
(one change stream for all tables, so a transaction touching several tables is applied as
one), the writer Deployment that holds the DuckDB file, the batch workers, and the knobs of
the service spec (strategy, consistency level, batch sizes, circuit breaker, retries, dead
letter queue, alert thresholds). Tables refer to it by name (SyncTable.spec.policyRef).

Why the DSN is only a Secret reference: a resource spec is readable by anyone who can list
the resource and ends up in Git under GitOps; credentials must not.

Why some fields are immutable: the slot and the publication are named once and hold the
replication position; renaming them or switching the target kind would silently start over
from a new snapshot (or orphan a slot that retains WAL on the primary until its disk fills).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datasync.api.common import (
    AGE_COLUMN,
    CONSISTENCY_HELP,
    READY_COLUMN_PATH,
    STRATEGY_HELP,
    ApiModel,
    ConsistencyLevel,
    CrdInfo,
    Int64,
    Lsn,
    PrinterColumn,
    Quantity,
    Resource,
    ResourceRequirements,
    Rule,
    SecretKeyRef,
    StatusModel,
    Strategy,
    SubdomainName,
)
from datasync.api.conditions import Conditions

#: Longest SyncPolicy name: the operator derives Deployment, Service and PVC names from it.
MAX_NAME_LENGTH = 50


class Source(ApiModel):
    """Where the PostgreSQL source is and how to reach it."""

    secret_ref: SecretKeyRef = Field(
        description=(
            "Secret key holding the libpq connection string (DSN) of the source database, e.g. "
            "postgresql://user:password@host:5432/db. The role needs the REPLICATION attribute."
        )
    )


class Storage(ApiModel):
    """The PersistentVolumeClaim that holds the DuckDB file."""

    size: Quantity = Field(default="10Gi", description="Requested size of the volume, e.g. 10Gi.")
    storage_class_name: SubdomainName | None = Field(
        default=None, description="StorageClass of the volume; the cluster's default StorageClass when unset."
    )


class DuckDBTarget(ApiModel):
    """A single DuckDB file, written by one writer pod (DuckDB allows one writer per file)."""

    path: str = Field(
        default="/data/analytics.duckdb",
        max_length=255,
        pattern=r"^(/[A-Za-z0-9._-]+)+/[A-Za-z0-9._-]+$",
        description="Absolute path of the DuckDB file in the writer pod; the volume is mounted at its directory.",
    )
    storage: Storage = Field(default_factory=Storage, description="Volume that holds the DuckDB file.")
    memory_limit: str | None = Field(
        default=None,
        max_length=16,
        pattern=r"^[0-9]+(\.[0-9]+)?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
        description="DuckDB memory_limit setting, e.g. 2GB; DuckDB's default (80% of memory) when unset.",
    )
    threads: int | None = Field(
        default=None, ge=1, le=256, description="DuckDB worker threads; DuckDB's default (the CPU count) when unset."
    )


class DuckLakeTarget(ApiModel):
    """A DuckLake: catalog in PostgreSQL, data as Parquet files; allows many writers."""

    catalog_secret_ref: SecretKeyRef = Field(
        description="Secret key holding the DSN of the PostgreSQL database used as the DuckLake catalog."
    )
    data_path: str = Field(
        min_length=1,
        max_length=1024,
        description="Where DuckLake writes Parquet data files, e.g. s3://bucket/prefix/ or a path on a shared volume.",
    )
    credentials_secret_ref: SubdomainName | None = Field(
        default=None,
        description="Name of a Secret whose keys become environment variables of the workers (e.g. AWS_ACCESS_KEY_ID).",
    )


class Target(ApiModel):
    """The analytics copy."""

    __cel__ = (
        Rule(
            rule="self.type != 'ducklake' || has(self.ducklake)",
            message="target.ducklake is required when target.type is ducklake",
            check=lambda t: t.type != "ducklake" or t.ducklake is not None,
            field_path=".ducklake",
            reason="FieldValueRequired",
        ),
        Rule(
            rule="self.type == 'ducklake' || !has(self.ducklake)",
            message="target.ducklake is only allowed when target.type is ducklake",
            check=lambda t: t.type == "ducklake" or t.ducklake is None,
            field_path=".ducklake",
            reason="FieldValueForbidden",
        ),
        Rule(
            rule="self.type == 'duckdb' || !has(self.duckdb)",
            message="target.duckdb is only allowed when target.type is duckdb",
            check=lambda t: t.type == "duckdb" or t.duckdb is None,
            field_path=".duckdb",
            reason="FieldValueForbidden",
        ),
        Rule(
            rule="self.type == oldSelf.type",
            message="target.type is immutable: create a new SyncPolicy for another kind of target",
            transition=lambda old, new: old.type == new.type,
            field_path=".type",
        ),
    )

    type: Literal["duckdb", "ducklake"] = Field(
        default="duckdb", description="Kind of target: duckdb (one file on a volume) or ducklake (catalog + Parquet files)."
    )
    duckdb: DuckDBTarget | None = Field(
        default=None, description="Settings of a duckdb target; defaults apply when unset and type is duckdb."
    )
    ducklake: DuckLakeTarget | None = Field(
        default=None, description="Settings of a ducklake target; required when type is ducklake."
    )

    def duckdb_settings(self) -> DuckDBTarget:
        """The duckdb settings, with defaults when the section is omitted."""
        return self.duckdb or DuckDBTarget()


class SyncDefaults(ApiModel):
    """How changes are applied unless a SyncTable overrides it."""

    strategy: Strategy = Field(default="hybrid", description=f"How the applier batches changes. {STRATEGY_HELP}")
    consistency_level: ConsistencyLevel = Field(
        default="eventual", description=f"Default consistency level of dual-writes through the API. {CONSISTENCY_HELP}"
    )
    # 50k, as the CLI: 10k batches (the reference service's DATA_SYNC_BATCH_SIZE) took ~25% more CPU
    # and ~13% longer on a burst of 270k changes; a batch also closes at maxBatchSeconds, so
    # latency does not depend on it
    batch_size: int = Field(
        default=50000,
        ge=1,
        le=1_000_000,
        description="Most changes applied in one DuckDB transaction (a batch also closes after maxBatchSeconds).",
    )
    max_batch_seconds: float = Field(
        default=1.0, ge=0, le=3600, description="Longest a change waits for its batch to fill before it is applied."
    )


class Workers(ApiModel):
    """Bounds of the batch worker pods (snapshot and backfill readers), scaled from queue depth.

    The single writer pod that owns the DuckDB file is not counted here.
    """

    __cel__ = (
        Rule(
            rule="!has(self.min) || !has(self.max) || self.min <= self.max",
            message="workers.min must be less than or equal to workers.max",
            check=lambda w: w.min <= w.max,
        ),
    )

    min: int = Field(default=0, ge=0, le=100, description="Fewest batch workers, also when the queue is empty.")
    max: int = Field(default=4, ge=1, le=100, description="Most batch workers.")
    queue_depth_per_worker: int = Field(
        default=1000, ge=1, le=1_000_000, description="Queued work items per worker the scaler aims for."
    )


class DualWrite(ApiModel):
    """The dual-write API (writes that commit in PostgreSQL and reach DuckDB through the change stream)."""

    enabled: bool = Field(default=True, description="Serve the dual-write endpoints of the REST API.")
    strong_timeout_seconds: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="How long a strong write waits for DuckDB to apply it before failing with a pending operation.",
    )


class Breaker(ApiModel):
    """Circuit breaker around the target: stop hammering it after repeated failures."""

    failure_threshold: int = Field(default=5, ge=1, le=1000, description="Consecutive failed batches that open the breaker.")
    reset_timeout_seconds: int = Field(
        default=60, ge=1, le=86400, description="Seconds the breaker stays open before one trial batch (half-open)."
    )
    max_retained_wal_bytes: Quantity | None = Field(
        default=None,
        description=(
            "Retained WAL (e.g. 20Gi) at which the slot is dropped and the tables are re-snapshotted, before "
            "PostgreSQL's max_slot_wal_keep_size invalidates it or the primary's disk fills; never when unset."
        ),
    )


class Retry(ApiModel):
    """Retries of a failed operation before it goes to the dead letter queue."""

    __cel__ = (
        Rule(
            rule="self.backoffSeconds <= self.maxBackoffSeconds",
            message="retry.backoffSeconds must not exceed retry.maxBackoffSeconds",
            check=lambda r: r.backoff_seconds <= r.max_backoff_seconds,
        ),
    )

    max_attempts: int = Field(default=5, ge=1, le=100, description="Attempts per operation, the first included.")
    backoff_seconds: float = Field(default=1.0, ge=0, le=3600, description="Wait before the first retry; doubles on each retry.")
    max_backoff_seconds: float = Field(default=300.0, ge=0, le=86400, description="Longest wait between two retries.")


class DeadLetterQueue(ApiModel):
    """Operations that failed every retry, kept in a PostgreSQL table for inspection and replay."""

    retention_days: int = Field(default=7, ge=1, le=365, description="Days a dead-lettered operation is kept.")


class Alerts(ApiModel):
    """Thresholds that turn metrics into Prometheus alerts and Degraded conditions."""

    lag_seconds_threshold: int = Field(
        default=900, ge=1, le=604800, description="Replication lag (seconds) above which a table is Degraded."
    )
    retained_wal_bytes_threshold: Quantity = Field(
        default="1Gi", description="WAL retained by the slot (e.g. 1Gi) above which the policy is Degraded."
    )
    consistency_score_threshold: float = Field(
        default=90.0, ge=0, le=100, description="Consistency score (percent) below which a ConsistencyCheck is not Consistent."
    )
    dead_letter_queue_threshold: int = Field(
        default=100, ge=0, le=100_000_000, description="Dead-lettered operations above which the policy is Degraded."
    )


class SyncPolicySpec(ApiModel):
    """Desired state of a SyncPolicy."""

    __cel__ = (
        Rule(
            rule="has(self.slotName) == has(oldSelf.slotName) && (!has(self.slotName) || self.slotName == oldSelf.slotName)",
            message="slotName is immutable: the slot holds the replication position; create a new SyncPolicy instead",
            transition=lambda old, new: old.slot_name == new.slot_name,
            field_path=".slotName",
        ),
        Rule(
            rule=(
                "has(self.publicationName) == has(oldSelf.publicationName) && "
                "(!has(self.publicationName) || self.publicationName == oldSelf.publicationName)"
            ),
            message="publicationName is immutable: create a new SyncPolicy instead",
            transition=lambda old, new: old.publication_name == new.publication_name,
            field_path=".publicationName",
        ),
    )

    source: Source = Field(description="The PostgreSQL source.")
    target: Target = Field(default_factory=Target, description="The analytics target.")
    defaults: SyncDefaults = Field(default_factory=SyncDefaults, description="Defaults for the policy's SyncTables.")
    slot_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9_]+$",
        description="Logical replication slot name (lower case, digits, _); derived from namespace and name when unset.",
    )
    publication_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="Publication name (lower case, digits, _); derived from namespace and name when unset.",
    )
    workers: Workers = Field(default_factory=Workers, description="Bounds of the batch worker pool.")
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Container image of the writer and workers; the operator's own image when unset.",
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Compute resources of the writer and worker containers."
    )
    dual_write: DualWrite = Field(default_factory=DualWrite, description="Dual-write API settings.")
    breaker: Breaker = Field(default_factory=Breaker, description="Circuit breaker settings.")
    retry: Retry = Field(default_factory=Retry, description="Retry settings.")
    dead_letter_queue: DeadLetterQueue = Field(default_factory=DeadLetterQueue, description="Dead letter queue settings.")
    alerts: Alerts = Field(default_factory=Alerts, description="Alert thresholds.")
    suspend: bool = Field(
        default=False, description="Stop applying changes (the slot keeps them, retaining WAL) until false again."
    )


class SyncPolicyStatus(StatusModel):
    """Observed state of a SyncPolicy, written by the operator."""

    conditions: Conditions | None = Field(
        default=None, description="Current state: Ready, SourceConnected, SlotReady, BreakerClosed."
    )
    observed_generation: Int64 | None = Field(default=None, description="metadata.generation this status was computed for.")
    phase: Literal["Pending", "Ready", "Degraded", "Suspended", "Failed"] | None = Field(
        default=None, description="One-word summary of the conditions."
    )
    tables: int | None = Field(default=None, ge=0, description="Number of SyncTables referring to this policy.")
    workers: int | None = Field(
        default=None, ge=0, description="Worker pods currently requested: the policy's writer plus batch workers."
    )
    slot_name: str | None = Field(default=None, max_length=63, description="Name of the replication slot in use.")
    publication_name: str | None = Field(default=None, max_length=63, description="Name of the publication in use.")
    slot_lag_bytes: Int64 | None = Field(default=None, description="WAL bytes the slot retains (not yet applied to the target).")
    confirmed_lsn: Lsn | None = Field(
        default=None, description="Last WAL position applied to the target and confirmed to the slot."
    )
    queue_depth: Int64 | None = Field(default=None, description="Work items waiting in the queue.")
    dead_letter_count: Int64 | None = Field(default=None, description="Operations in the dead letter queue.")
    breaker_state: Literal["Closed", "Open", "HalfOpen"] | None = Field(default=None, description="State of the circuit breaker.")
    message: str | None = Field(default=None, max_length=4096, description="Human-readable detail about the phase.")


class SyncPolicy(Resource):
    """A PostgreSQL source, an analytics target and the settings for keeping them in sync."""

    __cel__ = (
        Rule(
            rule=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            message=f"SyncPolicy names are at most {MAX_NAME_LENGTH} characters (the operator derives object names from them)",
            check=lambda p: len(p.metadata.name or "") <= MAX_NAME_LENGTH,
        ),
    )

    kind: Literal["SyncPolicy"] = Field(default="SyncPolicy", description="Kind of the resource.")
    spec: SyncPolicySpec = Field(description="Desired state.")
    status: SyncPolicyStatus | None = Field(default=None, description="Observed state, written by the operator.")


CRD = CrdInfo(
    kind="SyncPolicy",
    plural="syncpolicies",
    singular="syncpolicy",
    short_names=("sp",),
    model=SyncPolicy,
    printer_columns=(
        PrinterColumn("Tables", "integer", ".status.tables", "SyncTables using the policy."),
        PrinterColumn("Workers", "integer", ".status.workers", "Worker pods requested (writer + batch workers)."),
        PrinterColumn("Slot Lag", "integer", ".status.slotLagBytes", "WAL bytes retained by the replication slot."),
        PrinterColumn("Ready", "string", READY_COLUMN_PATH, "Status of the Ready condition."),
        PrinterColumn("Target", "string", ".spec.target.type", "Kind of target.", priority=1),
        PrinterColumn("Slot", "string", ".status.slotName", "Replication slot.", priority=1),
        PrinterColumn("Phase", "string", ".status.phase", "Summary of the state.", priority=1),
        AGE_COLUMN,
    ),
)
