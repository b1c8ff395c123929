"""Handlers of one policy that meet at its lock, run against a real apiserver and PostgreSQL.

The timer's reconcile, the SyncTable finalizers and admission all take the policy's lock.
Whatever they decide from the list of tables must come from a list read under that lock.
Otherwise a reconcile that waited while the last table's finalizer dropped slot and
publication creates both again. Nothing would read that slot, and it would retain WAL on
the source until the policy is deleted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from datasync import kube
from datasync.controllers import naming, syncpolicies
from datasync.sources.embedded import EmbeddedPostgres
from tests.e2e.cluster import ControlPlane
from tests.e2e.test_operator import apply, publication_tables, slots

NS = "ds-e2e-locking"
API = "datasync.dev/v1alpha1"


@pytest.fixture
def source() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres()
    server.start()
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        yield server
    finally:
        server.cleanup()


def _policy_and_table(cp: ControlPlane, ns: str, dsn: str, table_finalizers: list[str] | None = None) -> kube.Kube:
    """Secret, SyncPolicy ``p`` and SyncTable ``items`` in ``ns`` (which exists); a client of the apiserver."""
    cp.kubectl("create", "secret", "generic", "src", "-n", ns, f"--from-literal=dsn={dsn}")
    apply(cp, {"apiVersion": API, "kind": "SyncPolicy", "metadata": {"name": "p", "namespace": ns},
                "spec": {"source": {"secretRef": {"name": "src", "key": "dsn"}},
                         "target": {"type": "duckdb", "duckdb": {"path": "/data/p.duckdb"}}}})  # fmt: skip
    metadata: dict[str, Any] = {"name": "items", "namespace": ns}
    if table_finalizers:
        metadata["finalizers"] = table_finalizers
    apply(cp, {"apiVersion": API, "kind": "SyncTable", "metadata": metadata,
                "spec": {"policyRef": {"name": "p"}, "source": {"table": "items"}}})  # fmt: skip
    configuration = k8s_client.Configuration()
    k8s_config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    return kube.Kube(k8s_client.ApiClient(configuration))


def test_a_reconcile_that_waited_for_the_last_tables_finalizer_does_not_recreate_the_slot(
    installed: ControlPlane, source: EmbeddedPostgres
) -> None:
    cp = installed
    dsn = source.dsn()
    cp.kubectl("create", "namespace", NS)
    try:
        # the operator's finalizer, as admission leaves it: no operator runs here to remove it
        client = _policy_and_table(cp, NS, dsn, table_finalizers=["datasync.dev/finalizer"])
        body = client.get(kube.path(API, "syncpolicies", NS, "p"))
        assert body is not None
        policy = syncpolicies.parse(body)
        slot, publication = naming.slot_name(policy), naming.publication_name(policy)
        assert syncpolicies.reconcile(client, body)["tables"] == 1  # creates slot and publication
        assert slots(dsn) == [slot] and publication_tables(dsn, publication) == []

        results: list[dict[str, Any]] = []
        with syncpolicies.policy_lock(NS, "p"):  # held as the last table's finalizer holds it
            timer = threading.Thread(target=lambda: results.append(syncpolicies.reconcile(client, body)))
            timer.start()
            time.sleep(1.0)  # the reconcile reads what it reads before the lock, then waits for it
            assert timer.is_alive()
            # meanwhile the table is deleted and its finalizer drops slot and publication
            cp.kubectl("delete", "synctable", "items", "-n", NS, "--wait=false")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                conn.execute(f'DROP PUBLICATION "{publication}"')
        timer.join(timeout=60)
        assert not timer.is_alive()
        assert results and results[0]["tables"] == 0
        assert slots(dsn) == [] and publication_tables(dsn, publication) is None  # the slot stays dropped
    finally:
        cp.kubectl("patch", "synctable", "items", "-n", NS, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                   check=False)  # fmt: skip
        cp.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_a_slot_dropped_once_the_writer_streams_is_left_for_the_writer_to_make(
    installed: ControlPlane, source: EmbeddedPostgres
) -> None:
    """Reconcile and admission make a missing slot while no table is the writer's yet. Once the
    writer streams, a slot made again would lack the changes in between and the copy would keep
    that gap: they leave it missing (SlotLost), for the writer's engine to copy anew and make."""
    from datasync.controllers import synctables

    ns = NS + "-lost"
    cp = installed
    dsn = source.dsn()
    cp.kubectl("create", "namespace", ns)
    try:
        client = _policy_and_table(cp, ns, dsn)

        def policy_body() -> dict[str, Any]:
            body = client.get(kube.path(API, "syncpolicies", ns, "p"))
            assert body is not None
            return body

        def table_body() -> dict[str, Any]:
            body = client.get(kube.path(API, "synctables", ns, "items"))
            assert body is not None
            return body

        slot = naming.slot_name(syncpolicies.parse(policy_body()))

        def drop() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))

        # not the writer's yet: a missing slot is made (by reconcile, and by admission)
        syncpolicies.reconcile(client, policy_body())
        assert slots(dsn) == [slot]
        drop()
        synctables.admit(client, table_body())
        assert slots(dsn) == [slot]

        # the writer takes the table over (its Ready reason), then the slot is dropped
        cp.kubectl("patch", "synctable", "items", "-n", ns, "--subresource=status", "--type=merge", "-p",
                   '{"status": {"phase": "Streaming", "conditions": [{"type": "Ready", "status": "True", '
                   '"reason": "Streaming", "message": "streaming", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}')
        drop()
        status = syncpolicies.reconcile(client, policy_body())
        assert slots(dsn) == []
        lost = next(c for c in status["conditions"] if c["type"] == "SlotReady")
        assert lost["status"] == "False" and lost["reason"] == "SlotLost", lost
        assert "the writer copies the tables anew" in lost["message"]
        synctables.admit(client, table_body())  # as on an operator restart (resume)
        assert slots(dsn) == []
    finally:
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
