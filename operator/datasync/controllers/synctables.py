"""SyncTable controller: admission into the policy's publication, and release on delete.

Admission (create, spec change, operator start): the policy must exist, the source table must
pass the engine's own checks (it exists, the sync user may read it, it has a key or replica
identity — adding a table without one to a publication would make the application's UPDATEs
fail on the source), then the table joins the publication (``ALTER PUBLICATION ... ADD
TABLE``) and the policy's slot exists. The table is then ``Pending`` until the writer (the
policy's worker) takes over and reports ``Snapshotting`` and ``Streaming``; from then on the
worker owns the status. Problems leave the table ``Degraded`` with the reason and are retried.

Release (the finalizer): only the writer may touch the DuckDB file (one writer per file), so
deleting a table is a hand-over. The worker sees the deletion, stops streaming it, drops the
DuckDB table when ``reclaimPolicy: delete`` (keeps it for ``retain``) and reports
``Released=True``; the operator then removes the table from the publication and, when it was
the policy's last table, drops the slot and the publication. A writer that does not answer
within ``DATASYNC_RELEASE_TIMEOUT_SECONDS`` (scaled to zero, crash-looping) does not block the
deletion forever: the operator goes ahead, and the writer, when it comes back, stops
syncing tables no SyncTable asks for and keeps their data (``retain``; dropping data needs
an explicit, still-existing request). A warning event says so.
"""

from __future__ import annotations

from typing import Any

import kopf
import psycopg2

from datasync import errors, identifiers, kube
from datasync.api import GROUP, VERSION, SyncPolicy, SyncTable
from datasync.api.conditions import READY
from datasync.controllers import config, naming, sources, statuses, syncpolicies
from datasync.sources import checking, replication

PLURAL = "synctables"

#: Ready-condition reasons the operator sets; any other reason means the worker owns the status.
OPERATOR_REASONS = frozenset({"WaitingForWriter", "PolicyNotFound", "TableNotFound", "TableCheckFailed", "SourceUnavailable"})
#: Condition the worker sets once it has let go of a deleted table.
RELEASED = "Released"


def source_table(table: SyncTable) -> identifiers.TableName:
    return identifiers.TableName(table.spec.source.schema_name, table.spec.source.table)


def worker_owns(status: dict[str, Any]) -> bool:
    """Whether the worker has taken the table over (its status is no longer the operator's to write)."""
    ready = statuses.condition(status, READY)
    return ready is not None and ready.get("reason") not in OPERATOR_REASONS


def _set(client: kube.Kube, body: Any, phase: str, reason: str, message: str) -> None:
    table = SyncTable.model_validate(dict(body))
    current = dict(body.get("status") or {})
    generation = table.metadata.generation
    statuses.patch(
        client,
        PLURAL,
        table.metadata.namespace or "",
        table.metadata.name or "",
        {
            "phase": phase,
            "message": message,
            "observedGeneration": generation,
            "conditions": statuses.with_conditions(current, [(READY, "False", reason, message)], generation),
        },
    )


def admit(client: kube.Kube, body: Any) -> str:
    """Check the table and add it to the publication; returns the publication. Raises kopf.TemporaryError to retry."""
    table = SyncTable.model_validate(dict(body))
    namespace = table.metadata.namespace or ""
    policy = syncpolicies.get_policy(client, namespace, table.spec.policy_ref.name)
    if policy is None:
        message = f"SyncPolicy {table.spec.policy_ref.name} does not exist in namespace {namespace}"
        _set(client, body, "Degraded", "PolicyNotFound", message)
        raise kopf.TemporaryError(message, delay=10)
    source = source_table(table)
    publication = naming.publication_name(policy)
    try:
        with syncpolicies.policy_lock(namespace, policy.metadata.name or ""), sources.connect(client, policy) as conn:
            if not sources.table_exists(conn, source):
                message = f"source table {source} does not exist"
                _set(client, body, "Degraded", "TableNotFound", message)
                raise kopf.TemporaryError(message, delay=15)
            try:
                checking.check_tables(conn, [source])
            except errors.SourceError as exc:
                _set(client, body, "Degraded", "TableCheckFailed", sources.describe(exc))
                raise kopf.TemporaryError(exc.message, delay=30) from None
            policy_name = policy.metadata.name or ""
            syncpolicies.ensure_replication(  # the tables are listed only when the slot is missing
                conn, policy, lambda: not syncpolicies.writer_streams(syncpolicies.live_tables(client, namespace, policy_name))
            )
            if source not in (replication.publication_tables(conn, publication) or set()):
                replication.add_tables(conn, publication, [source])
    except sources.SourceProblem as exc:
        _set(client, body, "Degraded", "SourceUnavailable", exc.message)
        raise kopf.TemporaryError(exc.message, delay=15) from None
    except errors.SourceError as exc:
        _set(client, body, "Degraded", "SourceUnavailable", sources.describe(exc))
        raise kopf.TemporaryError(exc.message, delay=15) from None
    status = dict(body.get("status") or {})
    if not worker_owns(status):
        message = f"in publication {publication}; waiting for writer {naming.writer_name(policy.metadata.name or '')}"
        _set(client, body, "Pending", "WaitingForWriter", message)
    return publication


def release(client: kube.Kube, policy: SyncPolicy, table: SyncTable) -> bool:
    """Remove the table from the publication; drop slot and publication with the last table. True: slot dropped."""
    namespace, policy_name = policy.metadata.namespace or "", policy.metadata.name or ""
    source = source_table(table)
    with syncpolicies.policy_lock(namespace, policy_name), sources.connect(client, policy) as conn:
        # listed under the lock: a table admitted meanwhile must keep its slot and publication
        others = [
            t for t in syncpolicies.live_tables(client, namespace, policy_name) if t["metadata"]["name"] != table.metadata.name
        ]
        publication = naming.publication_name(policy)
        if source in (replication.publication_tables(conn, publication) or set()):
            replication.drop_tables(conn, publication, [source])
        if others:
            return False
        sources.drop_slot_forcibly(conn, naming.slot_name(policy))
        replication.drop_publication(conn, publication)
        return True


# --------------------------------------------------------------------------- kopf handlers


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    publication = admit(kube.shared(), body)
    logger.info("table is in publication %s", publication)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(body: kopf.Body, runtime: Any, retry: int, logger: kopf.Logger, **_: Any) -> None:
    client = kube.shared()
    table = SyncTable.model_validate(dict(body))
    policy = syncpolicies.get_policy(client, table.metadata.namespace or "", table.spec.policy_ref.name)
    if policy is None:
        logger.info("policy is gone (its finalizer dropped slot and publication): nothing to release")
        return
    status = dict(body.get("status") or {})
    if worker_owns(status) and not statuses.is_true(status, RELEASED):
        waited = runtime.total_seconds()
        if waited < config.current.release_timeout_seconds:
            raise kopf.TemporaryError("waiting for the writer to release the table", delay=2)
        kopf.warn(
            body,
            reason="ReleaseTimeout",
            message=f"the writer did not release the table within {waited:.0f}s; removing it from the publication "
            "anyway (the DuckDB table is kept)",
        )
    try:
        dropped = release(client, policy, table)
    except (sources.SourceProblem, errors.SourceError, psycopg2.Error) as exc:
        message = exc.message if isinstance(exc, (sources.SourceProblem, errors.DataSyncError)) else str(exc)
        if retry < 5:
            raise kopf.TemporaryError(f"cannot update the publication yet: {message}", delay=5) from None
        kopf.warn(body, reason="PublicationNotUpdated", message=f"giving up: {message}")
        return
    if dropped:
        logger.info("last table of policy %s: dropped slot %s", policy.metadata.name, naming.slot_name(policy))
