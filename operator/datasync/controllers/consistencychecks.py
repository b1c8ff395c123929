"""ConsistencyCheck controller: admission and hand-over to the policy's writer.

The runs themselves happen in the writer (``datasync.working.checks``): only the process that
owns the DuckDB file can read it, and only the writer can stop its own stream at the exact
position a PostgreSQL snapshot was taken at. What is left for the operator is what the writer
cannot see or should not decide:

* the policy must exist (``PolicyNotFound``) and every table must be a SyncTable of that policy
  (``TableNotFound``/``WrongPolicy``): reported at once, without waiting for a writer;
* a check admitted for a new spec is marked ``Pending`` ("waiting for the writer"), so
  ``kubectl get cc`` says why nothing has happened yet while the writer is starting.

The writer owns everything a run writes: phase Running/Complete/Failed, score, results,
history, ``observedGeneration`` and ``nextRun``; this controller never overwrites those.
"""

from __future__ import annotations

from typing import Any

import kopf

from datasync import kube
from datasync.api import GROUP, VERSION, ConsistencyCheck
from datasync.api.conditions import COMPLETE, READY
from datasync.controllers import statuses, syncpolicies

PLURAL = "consistencychecks"


def admit(client: kube.Kube, body: Any) -> dict[str, Any] | None:
    """Report problems the writer cannot, or hand the check over; the status written (None: nothing to do)."""
    check = ConsistencyCheck.model_validate(dict(body))
    namespace, name = check.metadata.namespace or "", check.metadata.name or ""
    generation = check.metadata.generation
    current = dict(body.get("status") or {})
    if current.get("observedGeneration") == generation or current.get("phase") == "Running":
        return None  # the writer has this spec in hand
    policy_name = check.spec.policy_ref.name
    problem: tuple[str, str] | None = None
    if syncpolicies.get_policy(client, namespace, policy_name) is None:
        problem = ("PolicyNotFound", f"SyncPolicy {policy_name} does not exist")
    else:
        for table in check.spec.tables:
            obj = client.get(kube.path(f"{GROUP}/{VERSION}", "synctables", namespace, table))
            if obj is None:
                problem = ("TableNotFound", f"SyncTable {table} does not exist")
                break
            owner = ((obj.get("spec") or {}).get("policyRef") or {}).get("name")
            if owner != policy_name:
                problem = ("WrongPolicy", f"SyncTable {table} belongs to SyncPolicy {owner}, not {policy_name}")
                break
    if problem is None:
        reason, message = "WaitingForWriter", f"waiting for the writer of SyncPolicy {policy_name} to run the check"
    else:
        reason, message = problem
    status = {
        "phase": "Pending",
        "message": message,
        "conditions": statuses.with_conditions(
            current, [(COMPLETE, "False", reason, message), (READY, "False", reason, message)], generation
        ),
    }
    statuses.patch(client, PLURAL, namespace, name, status)
    if problem is not None:
        raise kopf.TemporaryError(message, delay=15)  # tables or policy may appear: look again
    return status


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    status = admit(kube.shared(), body)
    if status is not None:
        logger.info("consistency check: %s", status["message"])
