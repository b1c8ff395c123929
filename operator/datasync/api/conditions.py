"""Status conditions in the standard Kubernetes shape (``metav1.Condition``).

Why the exact upstream shape (same fields, patterns and bounds): tools such as Argo CD, kstatus
and ``kubectl wait --for=condition=Ready`` read conditions generically. The list is a map keyed
by ``type`` (``x-kubernetes-list-type: map``), so server-side apply and the operator can
update one condition without rewriting the others.

:func:`set_condition` keeps ``lastTransitionTime`` stable while the status does not change,
which is what makes "Ready since ..." meaningful.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import Field

from datasync.api.common import StatusModel

ConditionStatus = Literal["True", "False", "Unknown"]

#: Every kind: the resource does what its spec asks (Argo CD Healthy when True).
READY = "Ready"
#: SyncPolicy: the source database is reachable with the DSN from the Secret.
SOURCE_CONNECTED = "SourceConnected"
#: SyncPolicy: the publication and the replication slot exist and the slot is not invalidated.
SLOT_READY = "SlotReady"
#: SyncPolicy: the circuit breaker is closed (False while it holds changes back).
BREAKER_CLOSED = "BreakerClosed"
#: SyncTable: the initial copy has finished.
SNAPSHOTTED = "Snapshotted"
#: ConsistencyCheck: the latest run finished.
COMPLETE = "Complete"
#: ConsistencyCheck: the latest run found no difference (score at or above the alert threshold).
CONSISTENT = "Consistent"


class Condition(StatusModel):
    """One aspect of the resource's current state (metav1.Condition)."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Type of condition in CamelCase, e.g. Ready.",
    )
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        json_schema_extra={"format": "int64"},
        description="metadata.generation the condition was set for; older than the current generation means stale.",
    )
    last_transition_time: datetime = Field(description="When the condition last changed from one status to another.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Programmatic identifier of the reason for the last transition, in CamelCase.",
    )
    message: str = Field(max_length=32768, description="Human-readable details about the transition; may be empty.")


Conditions = Annotated[
    list[Condition],
    Field(
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


def get_condition(conditions: Iterable[Condition] | None, type_: str) -> Condition | None:
    """The condition of ``type_``, if present."""
    return next((c for c in conditions or () if c.type == type_), None)


def set_condition(
    conditions: Iterable[Condition] | None,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    now: datetime | None = None,
) -> list[Condition]:
    """A new list with condition ``type_`` set; its transition time moves only when the status changes."""
    current = list(conditions or ())
    old = get_condition(current, type_)
    when = old.last_transition_time if old is not None and old.status == status else (now or datetime.now(UTC))
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=observed_generation,
        last_transition_time=when.replace(microsecond=0),
    )
    return [new if c.type == type_ else c for c in current] if old is not None else [*current, new]
