"""ConsistencyCheck: compare SyncTables' copies with their PostgreSQL sources, once or on a schedule.

The service spec's validation types map to ``checks``: ``row_count`` compares counts,
``data_hash`` compares row hashes per key bucket and narrows mismatches down to keys,
``business_rules`` runs the SQL in ``rules``, ``referential_integrity`` checks the source's
foreign keys between the copied tables. Results, the consistency score (rows that are wrong
against rows compared, ``datasync.validation.comparing``) and a bounded history land in
status, so ``kubectl get consistencychecks`` is the report and Argo CD can show it.

Why checks reference SyncTables (not SQL table names): a SyncTable already knows its policy,
source, target, key and column filter, which is what a comparison needs. The policy's writer
runs the checks (DuckDB allows no second process on a file in use), both sides pinned at one
LSN, which the status reports.

A run starts when the spec changes, when the ``datasync.dev/run`` annotation gets a new value
(``kubectl annotate cc NAME datasync.dev/run="$(date +%s)" --overwrite``), and on the schedule.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from datasync.api.common import (
    AGE_COLUMN,
    LIST_SET,
    ApiModel,
    CrdInfo,
    Cron,
    Int64,
    Lsn,
    ObjectNames,
    PolicyRef,
    PrinterColumn,
    Resource,
    Rule,
    SqlName,
    StatusModel,
    SubdomainName,
    unique_items,
)
from datasync.api.conditions import Conditions

CheckType = Literal["row_count", "data_hash", "business_rules", "referential_integrity"]
CheckTypes = Annotated[
    list[CheckType], Field(min_length=1, max_length=4, json_schema_extra=LIST_SET), AfterValidator(unique_items)
]


def _default_checks() -> list[CheckType]:
    return ["row_count"]


RuleName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$")]


class BusinessRule(ApiModel):
    """A domain rule checked by the business_rules check."""

    name: RuleName = Field(description="Name of the rule, unique in the check (lower case, digits, - and _).")
    sql: str = Field(
        min_length=1,
        max_length=10000,
        description=(
            "A SELECT on the target (tables by their target names). Without compareWithSource the rule passes when it "
            "returns no rows (each row is a violation); with it, the rule passes when the source returns the same rows."
        ),
    )
    compare_with_source: bool = Field(
        default=False, description="Run the same SELECT on the source too and compare the results instead of expecting none."
    )
    description: str | None = Field(
        default=None, max_length=1024, description="What the rule guards, for people reading results."
    )


class ForeignKeyTarget(ApiModel):
    """The referenced side of a declared foreign key."""

    table: SubdomainName = Field(description="The referenced SyncTable (same policy).")
    columns: Annotated[list[SqlName], Field(min_length=1, max_length=32)] = Field(
        description="Referenced columns, in order (usually the key)."
    )


class DeclaredForeignKey(ApiModel):
    """A foreign key the source does not declare, checked by referential_integrity like the catalog's."""

    __cel__ = (
        Rule(
            rule="size(self.columns) == size(self.references.columns)",
            message="a foreign key needs as many columns as it references",
            check=lambda k: len(k.columns) == len(k.references.columns),
            field_path=".columns",
        ),
    )

    name: RuleName = Field(description="Name of the foreign key, unique in the check.")
    table: SubdomainName = Field(description="The referencing SyncTable.")
    columns: Annotated[list[SqlName], Field(min_length=1, max_length=32)] = Field(
        description="Referencing columns, in order. A row with any of them NULL is exempt (MATCH SIMPLE)."
    )
    references: ForeignKeyTarget = Field(description="The referenced SyncTable and columns.")


def _unique_fk_names(keys: list[DeclaredForeignKey] | None) -> list[DeclaredForeignKey] | None:
    if keys:
        unique_items([k.name for k in keys])
    return keys


def _unique_rule_names(rules: list[BusinessRule] | None) -> list[BusinessRule] | None:
    if rules:
        unique_items([r.name for r in rules])
    return rules


class ConsistencyCheckSpec(ApiModel):
    """Desired state of a ConsistencyCheck."""

    __cel__ = (
        Rule(
            rule="!('business_rules' in self.checks) || (has(self.rules) && size(self.rules) > 0)",
            message="checks include business_rules but spec.rules is empty: add rules or remove business_rules",
            check=lambda s: "business_rules" not in s.checks or bool(s.rules),
            field_path=".rules",
            reason="FieldValueRequired",
        ),
        Rule(
            rule="!has(self.rules) || size(self.rules) == 0 || 'business_rules' in self.checks",
            message="spec.rules only run with the business_rules check: add business_rules to spec.checks",
            check=lambda s: not s.rules or "business_rules" in s.checks,
            field_path=".checks",
        ),
    )

    policy_ref: PolicyRef = Field(description="The SyncPolicy whose source and target are compared.")
    tables: ObjectNames = Field(min_length=1, description="Names of the SyncTables to check (same namespace, same policy).")
    checks: CheckTypes = Field(
        default_factory=_default_checks,
        description="Checks to run: row_count, data_hash, business_rules, referential_integrity.",
    )
    rules: Annotated[list[BusinessRule] | None, AfterValidator(_unique_rule_names)] = Field(
        default=None,
        max_length=50,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Business rules, run by the business_rules check.",
    )
    foreign_keys: Annotated[list[DeclaredForeignKey] | None, AfterValidator(_unique_fk_names)] = Field(
        default=None,
        max_length=50,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Foreign keys to check besides those the source catalog declares (referential_integrity).",
    )
    schedule: Cron | None = Field(
        default=None, description='When to run, in cron syntax (UTC), e.g. "*/30 * * * *"; once (on each spec change) when unset.'
    )
    repair: bool = Field(
        default=False,
        description="Re-copy the rows found different (data_hash) or the whole table (row_count) after a failed check.",
    )
    history_limit: int = Field(default=10, ge=1, le=100, description="Runs kept in status.history.")
    timeout_seconds: int = Field(default=3600, ge=1, le=86400, description="Longest a run may take before it fails.")
    suspend: bool = Field(default=False, description="Skip scheduled runs while true.")


class CheckResult(StatusModel):
    """Outcome of one check on one table."""

    type: CheckType = Field(description="The check.")
    ok: bool = Field(description="Whether the check passed.")
    rule: str | None = Field(default=None, max_length=63, description="The business rule, for business_rules results.")
    message: str | None = Field(default=None, max_length=1024, description="What differed, for failed checks.")


class TableResult(StatusModel):
    """Outcome of the latest run for one table."""

    table: str = Field(max_length=253, description="Name of the SyncTable.")
    source_table: str | None = Field(default=None, max_length=260, description="The PostgreSQL table, schema.table.")
    ok: bool = Field(description="Whether every check passed for this table.")
    score: float | None = Field(default=None, ge=0, le=100, description="The table's consistency score, in percent.")
    row_count_source: Int64 | None = Field(default=None, description="Rows in the source table at the compared LSN.")
    row_count_target: Int64 | None = Field(default=None, description="Rows in the target table at the compared LSN.")
    mismatches: Int64 | None = Field(default=None, description="Rows found different (missing, extra or changed).")
    missing: Int64 | None = Field(default=None, description="Source rows the copy lacks (data_hash).")
    extra: Int64 | None = Field(default=None, description="Copy rows the source lacks (data_hash).")
    differing: Int64 | None = Field(default=None, description="Rows present on both sides with different values (data_hash).")
    orphans: Int64 | None = Field(default=None, description="Copy rows violating a foreign key (referential_integrity).")
    mismatched_keys: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=100, description="Keys of some differing rows (at most 100), rendered as text."
    )
    repaired: Int64 | None = Field(default=None, description="Rows re-copied by repair.")
    checks: list[CheckResult] | None = Field(default=None, max_length=64, description="Per-check outcomes.")


class RuleResult(StatusModel):
    """Outcome of one business rule."""

    name: RuleName = Field(description="The rule.")
    ok: bool = Field(description="Whether the rule holds.")
    violations: Int64 | None = Field(default=None, description="Rows the rule reported (or by which the results differ).")
    message: str | None = Field(default=None, max_length=1024, description="What was found.")
    sample: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=10, description="Some offending rows, rendered as text."
    )


class HistoryEntry(StatusModel):
    """Summary of one past run."""

    time: datetime = Field(description="When the run started.")
    score: float = Field(ge=0, le=100, description="Consistency score of the run, in percent.")
    consistent: bool = Field(description="Whether the run found no difference.")
    mismatches: Int64 | None = Field(default=None, description="Rows found different over all tables.")
    lsn: Lsn | None = Field(default=None, description="Source WAL position the run compared at.")
    duration_seconds: float | None = Field(default=None, ge=0, description="How long the run took.")
    repaired: Int64 | None = Field(default=None, description="Rows re-copied by repair in the run.")


class ConsistencyCheckStatus(StatusModel):
    """Observed state of a ConsistencyCheck, written by the operator."""

    conditions: Conditions | None = Field(default=None, description="Current state: Complete, Consistent, Ready.")
    observed_generation: Int64 | None = Field(default=None, description="metadata.generation this status was computed for.")
    phase: Literal["Pending", "Running", "Complete", "Failed"] | None = Field(
        default=None, description="State of the latest run."
    )
    score: float | None = Field(default=None, ge=0, le=100, description="Consistency score of the latest run, in percent.")
    consistent: bool | None = Field(default=None, description="Whether the latest run found no difference.")
    last_run: datetime | None = Field(default=None, description="When the latest run started.")
    next_run: datetime | None = Field(default=None, description="When the next scheduled run starts.")
    lsn: Lsn | None = Field(default=None, description="Source WAL position the latest run compared at.")
    duration_seconds: float | None = Field(default=None, ge=0, description="How long the latest run took.")
    tables: list[TableResult] | None = Field(default=None, max_length=100, description="Per-table results of the latest run.")
    rules: list[RuleResult] | None = Field(default=None, max_length=50, description="Business rule results of the latest run.")
    run_request: str | None = Field(
        default=None, max_length=253, description="The datasync.dev/run annotation value the latest run answered."
    )
    history: list[HistoryEntry] | None = Field(default=None, max_length=100, description="Latest runs, newest first.")
    message: str | None = Field(default=None, max_length=4096, description="Human-readable detail, e.g. why a run failed.")


class ConsistencyCheck(Resource):
    """A comparison of SyncTables' copies with their sources, and its results."""

    kind: Literal["ConsistencyCheck"] = Field(default="ConsistencyCheck", description="Kind of the resource.")
    spec: ConsistencyCheckSpec = Field(description="Desired state.")
    status: ConsistencyCheckStatus | None = Field(default=None, description="Observed state, written by the operator.")


CRD = CrdInfo(
    kind="ConsistencyCheck",
    plural="consistencychecks",
    singular="consistencycheck",
    short_names=("cc",),
    model=ConsistencyCheck,
    printer_columns=(
        PrinterColumn("Score", "number", ".status.score", "Consistency score of the latest run, in percent."),
        PrinterColumn("Consistent", "boolean", ".status.consistent", "Whether the latest run found no difference."),
        PrinterColumn("Last Run", "date", ".status.lastRun", "When the latest run started."),
        PrinterColumn("Schedule", "string", ".spec.schedule", "Cron schedule.", priority=1),
        PrinterColumn("Phase", "string", ".status.phase", "State of the latest run.", priority=1),
        AGE_COLUMN,
    ),
)
