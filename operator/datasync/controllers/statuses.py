"""Status writing shared by the controllers and the worker: conditions in, JSON patch out.

Why every status write goes through here: conditions must keep their ``lastTransitionTime``
while their status does not change (that is what makes "Ready since ..." meaningful and keeps
Argo CD quiet), carry the ``observedGeneration`` they were computed for, and be dumped with
the API models' camelCase names. Merge patches replace lists whole, so the current
conditions are read from the object and the complete new list is written.

Who writes what: the operator writes SyncPolicy and ConsistencyCheck status; for a SyncTable
it writes ``Pending``/``Degraded`` (admission problems) and the worker, once it runs the
table, everything else. Neither writes the other's fields back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datasync import kube
from datasync.api import API_VERSION, Condition, set_condition
from datasync.api.conditions import ConditionStatus

Status = dict[str, Any]


def conditions_of(status: Mapping[str, Any] | None) -> list[Condition]:
    return [Condition.model_validate(c) for c in (status or {}).get("conditions") or []]


def with_conditions(
    status: Mapping[str, Any] | None,
    updates: list[tuple[str, ConditionStatus, str, str]],
    generation: int | None,
) -> list[dict[str, Any]]:
    """The status's conditions with ``(type, status, reason, message)`` updates applied, as JSON."""
    conditions = conditions_of(status)
    for type_, value, reason, message in updates:
        conditions = set_condition(conditions, type_, value, reason, message[:32768], observed_generation=generation)
    return [c.model_dump(mode="json", exclude_none=True) for c in conditions]


def condition(status: Mapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == type_), None)


def is_true(status: Mapping[str, Any] | None, type_: str) -> bool:
    c = condition(status, type_)
    return c is not None and c.get("status") == "True"


def patch(client: kube.Kube, plural: str, namespace: str, name: str, status: Status) -> dict[str, Any] | None:
    """Merge ``status`` into the resource's status subresource (None: the resource is gone)."""
    return client.patch_status(API_VERSION, plural, namespace, name, status)
