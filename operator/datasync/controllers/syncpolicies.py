"""SyncPolicy controller: source checks, publication and slot, the writer's objects, status.

Level-based: the same idempotent :func:`reconcile` runs on create, on spec change, on operator
start (resume) and every ``DATASYNC_RESYNC_SECONDS`` (timer), so whatever went wrong
(Secret created late, database down, an object deleted by hand) heals on its own and the
status (slot lag, table count) stays fresh. Re-applying unchanged objects is a no-op on the
server (server-side apply), so a restarted operator changes nothing that is already right.

The slot exists while at least one SyncTable refers to the policy: it is created when the
first table is admitted (here or in :mod:`.synctables`, whichever runs first) and dropped
with the last one (the SyncTable finalizer) or with the policy (the finalizer here). A slot
nobody needs would only retain WAL on the primary. A slot dropped once the writer streams is
not made again here (``SlotReady=False``, ``SlotLost``): the writer copies the tables anew and
makes it (see :func:`writer_streams`).

Expected failures (Secret missing, DSN wrong, ``wal_level`` not logical, ...) are not
exceptions for kopf: they become ``Ready=False`` with a reason and the engine's message (never
the DSN), and the next timer tick tries again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kopf
import psycopg2

from datasync import errors, kube
from datasync.api import GROUP, VERSION, SyncPolicy
from datasync.api.common import quantity_bytes
from datasync.api.conditions import READY, SLOT_READY, SOURCE_CONNECTED
from datasync.controllers import config, naming, rendering, sources, statuses
from datasync.engine import pgoutput
from datasync.sources import checking, connecting, replication

log = logging.getLogger(__name__)

PLURAL = "syncpolicies"

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def policy_lock(namespace: str, name: str) -> Iterator[None]:
    """Serialise work on one policy's source objects (timer, handlers and table finalizers run concurrently)."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


def parse(body: Any) -> SyncPolicy:
    return SyncPolicy.model_validate(dict(body))


def get_policy(client: kube.Kube, namespace: str, name: str) -> SyncPolicy | None:
    obj = client.get(kube.path(f"{GROUP}/{VERSION}", PLURAL, namespace, name))
    return None if obj is None else SyncPolicy.model_validate(obj)


def table_objects(client: kube.Kube, namespace: str, policy: str) -> list[dict[str, Any]]:
    """SyncTables of the namespace referring to ``policy`` (those being deleted included)."""
    items = client.list(kube.path(f"{GROUP}/{VERSION}", "synctables", namespace))
    return [t for t in items if (t.get("spec") or {}).get("policyRef", {}).get("name") == policy]


def live_tables(client: kube.Kube, namespace: str, policy: str) -> list[dict[str, Any]]:
    return [t for t in table_objects(client, namespace, policy) if not t["metadata"].get("deletionTimestamp")]


def ensure_replication(
    conn: connecting.Connection, policy: SyncPolicy, may_make_slot: Callable[[], bool] = lambda: True
) -> bool:
    """Checks, then publication (empty is fine) and pgoutput slot; idempotent.

    False: the slot is missing and ``may_make_slot()`` (asked only then) said not to make it
    (see :func:`writer_streams`).
    """
    checking.check_server(conn)
    publication, slot = naming.publication_name(policy), naming.slot_name(policy)
    if not sources.publication_exists(conn, publication):
        sources.create_empty_publication(conn, publication)
    if replication.slot_info(conn, slot) is None:
        if not may_make_slot():
            return False
        checking.check_slots(conn, slot, need_snapshot=False)
        replication.create_slot(conn, slot)
    else:
        checking.check_slots(conn, slot, need_snapshot=False)  # plugin, invalidated slot
    return True


def writer_streams(tables: list[dict[str, Any]]) -> bool:
    """Whether the writer has taken any of ``tables`` over: from then on only it makes the slot again.

    A slot dropped after that (by hand, or invalidated and dropped) missed changes the target
    needs.  Made again here, it would let the writer stream on with that gap in the copy for
    good; left missing, the writer's engine finds it gone, copies the tables anew and makes a new
    one (``engine.syncing``).
    """
    from datasync.controllers import synctables  # (it imports this module)

    return any(synctables.worker_owns(dict(t.get("status") or {})) for t in tables)


def slot_figures(conn: connecting.Connection, slot: str) -> tuple[int | None, str | None]:
    """(retained WAL bytes = current WAL position - restart_lsn, confirmed LSN) of ``slot``."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, confirmed_flush_lsn::text "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None, None
    lag = int(row[0]) if row[0] is not None else None
    lsn = pgoutput.format_lsn(pgoutput.parse_lsn(row[1])) if row[1] else None
    return lag, lsn


def reconcile(client: kube.Kube, body: Any) -> dict[str, Any]:
    """Bring one policy to its desired state and write its status; returns the status written."""
    policy = parse(body)
    namespace, name = policy.metadata.namespace or "", policy.metadata.name or ""
    generation = policy.metadata.generation
    current = dict(body.get("status") or {})
    slot, publication = naming.slot_name(policy), naming.publication_name(policy)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "tables": 0,  # (listed under the policy's lock, below)
        "workers": 0,  # worker pods requested: the writer once rendered (batch workers: later)
        "publicationName": publication,
        "slotName": slot,
    }
    updates: list[tuple[str, Any, str, str]] = []
    problem: tuple[str, str] | None = None
    with policy_lock(namespace, name):
        # the tables are listed under the lock: the finalizer of the last table may have dropped
        # slot and publication while this waited, and a list read before would create them again
        # (a slot nothing reads, retaining WAL until the policy goes)
        tables = live_tables(client, namespace, name)
        status["tables"] = len(tables)
        if policy.spec.target.type != "duckdb":
            problem = ("Unsupported", "ducklake targets are not implemented yet; use target.type duckdb")
        else:
            try:
                with sources.connect(client, policy) as conn:
                    updates.append((SOURCE_CONNECTED, "True", "Connected", "the source accepts the DSN from the Secret"))
                    if tables and not ensure_replication(conn, policy, lambda: not writer_streams(tables)):
                        status["slotLagBytes"] = None
                        updates.append((SLOT_READY, "False", "SlotLost",
                                        f"slot {slot} was dropped after the writer began streaming: the writer "
                                        "copies the tables anew and makes it again (one made here would lack the "
                                        "changes in between)"))
                    elif tables:
                        lag, confirmed = slot_figures(conn, slot)
                        status["slotLagBytes"] = lag
                        status["confirmedLsn"] = confirmed
                        updates.append((SLOT_READY, "True", "Created", f"publication {publication} and slot {slot} exist"))
                    else:
                        checking.check_server(conn)
                        status["slotLagBytes"] = None
                        updates.append((SLOT_READY, "False", "NoTables", "the slot is created with the first SyncTable"))
            except sources.SourceProblem as exc:
                problem = (exc.reason, exc.message)
                updates.append((SOURCE_CONNECTED, "False", exc.reason, exc.message))
            except errors.SourceError as exc:
                problem = ("SourceCheckFailed", sources.describe(exc))
                updates.append((SOURCE_CONNECTED, "True", "Connected", "the source accepts the DSN from the Secret"))
                updates.append((SLOT_READY, "False", "SourceCheckFailed", sources.describe(exc)))
            except psycopg2.Error as exc:
                problem = ("SourceError", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if problem is None:
        try:
            for obj in rendering.owned_objects(policy, config.current.worker_image):
                client.apply(obj)
        except kube.ApiError as exc:
            problem = ("RenderFailed", f"cannot apply the writer's objects: {exc}")
    if problem is not None:
        reason, message = problem
        updates.append((READY, "False", reason, message))
        status["phase"] = "Failed" if reason in ("Unsupported",) else "Pending"
        status["message"] = message
    else:
        status["workers"] = 0 if policy.spec.suspend else 1
        message = f"writer {naming.writer_name(name)} rendered for {len(tables)} table(s)"
        phase = "Suspended" if policy.spec.suspend else "Ready"
        lag = status.get("slotLagBytes")
        threshold = quantity_bytes(policy.spec.alerts.retained_wal_bytes_threshold)
        if isinstance(lag, int) and lag > threshold:
            phase = "Degraded"
            message = f"the slot retains {lag} bytes of WAL, above alerts.retainedWalBytesThreshold ({threshold})"
        updates.append((READY, "True", "Reconciled", message))
        status["phase"] = phase
        status["message"] = message
    status["conditions"] = statuses.with_conditions(current, updates, generation)
    statuses.patch(client, PLURAL, namespace, name, status)
    return status


def release_source(client: kube.Kube, policy: SyncPolicy) -> None:
    """Drop the policy's slot and publication (the policy or its last table is going away)."""
    namespace, name = policy.metadata.namespace or "", policy.metadata.name or ""
    with policy_lock(namespace, name), sources.connect(client, policy) as conn:
        sources.drop_slot_forcibly(conn, naming.slot_name(policy))
        replication.drop_publication(conn, naming.publication_name(policy))


# --------------------------------------------------------------------------- kopf handlers


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    status = reconcile(kube.shared(), body)
    logger.info("reconciled: phase %s, %s table(s)", status.get("phase"), status.get("tables"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=config.current.resync_seconds, initial_delay=config.current.resync_seconds)
def on_timer(body: kopf.Body, **_: Any) -> None:
    reconcile(kube.shared(), body)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
    """Drop slot and publication; give up after a few attempts rather than block deletion forever."""
    policy = parse(body)
    try:
        release_source(kube.shared(), policy)
    except (sources.SourceProblem, errors.SourceError, psycopg2.Error) as exc:
        message = exc.message if isinstance(exc, (sources.SourceProblem, errors.DataSyncError)) else str(exc)
        if retry < 5:
            raise kopf.TemporaryError(f"cannot drop slot/publication yet: {message}", delay=5) from None
        kopf.warn(
            body,
            reason="SlotNotDropped",
            message=f"slot {naming.slot_name(policy)} may remain on the source and retain WAL: {message}",
        )
        return
    logger.info("dropped slot %s and publication %s", naming.slot_name(policy), naming.publication_name(policy))
