"""What the operator renders for a SyncPolicy, and the names it derives (pure, no cluster).

The same objects are checked on a real apiserver by tests/e2e/test_operator.py; here the
rules that must hold for every policy are pinned down: the restricted Pod Security profile,
one Recreate writer, the DSN only by reference, owner references, least-privilege RBAC.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from datasync.api import SyncPolicy, SyncTable
from datasync.controllers import naming, rendering
from datasync.working import tables

REPO = Path(__file__).resolve().parents[2]


def policy(**spec: Any) -> SyncPolicy:
    return SyncPolicy.model_validate(
        {
            "apiVersion": "datasync.dev/v1alpha1",
            "kind": "SyncPolicy",
            "metadata": {"name": "shop", "namespace": "analytics", "uid": "1234-abcd", "generation": 3},
            "spec": {"source": {"secretRef": {"name": "shop-postgres", "key": "uri"}}, **spec},
        }
    )


def test_names_are_derived_and_valid() -> None:
    p = policy()
    assert naming.slot_name(p) == "datasync_analytics_shop"
    assert naming.publication_name(p) == "datasync_analytics_shop"
    assert naming.writer_name("shop") == "datasync-shop"
    assert naming.volume_claim_name("shop") == "datasync-shop-data"
    named = policy(slotName="my_slot", publicationName="my_pub")
    assert (naming.slot_name(named), naming.publication_name(named)) == ("my_slot", "my_pub")
    long = SyncPolicy.model_validate({**p.model_dump(mode="json"), "metadata": {"name": "x" * 50, "namespace": "n" * 63}})
    slot = naming.slot_name(long)
    assert len(slot) <= 63 and slot.startswith("datasync_") and slot == naming.slot_name(long)


def test_deployment_is_one_restricted_recreate_writer() -> None:
    d = rendering.deployment(policy(), "example.invalid/datasync:1")
    assert d["metadata"]["name"] == "datasync-shop" and d["metadata"]["namespace"] == "analytics"
    spec = d["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "datasync-shop"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 10001
    (c,) = pod["containers"]
    assert c["image"] == "example.invalid/datasync:1"
    assert c["command"] == ["datasync"] and c["args"][1:] == ["worker", "--policy=shop", "--namespace=analytics"]
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # Every writable place is a volume: the DuckDB directory and /tmp (HOME).
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/data": "data", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"] == {"name": "data", "persistentVolumeClaim": {"claimName": "datasync-shop-data"}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    env = {e["name"]: e for e in c["env"]}
    assert env["DATASYNC_SOURCE_DSN"]["valueFrom"] == {"secretKeyRef": {"name": "shop-postgres", "key": "uri"}}
    assert "value" not in env["DATASYNC_SOURCE_DSN"]
    assert env["HOME"]["value"] == "/tmp"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]


def test_deployment_follows_the_spec() -> None:
    p = policy(
        image="example.invalid/custom:2",
        suspend=True,
        resources={"limits": {"memory": "4Gi"}},
        target={"type": "duckdb", "duckdb": {"path": "/var/lib/ds/copy.duckdb"}},
    )
    d = rendering.deployment(p, "example.invalid/datasync:1")
    assert d["spec"]["replicas"] == 0  # suspended
    (c,) = d["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "example.invalid/custom:2"
    assert c["resources"] == {"limits": {"memory": "4Gi"}}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/var/lib/ds", "/tmp"}


def test_everything_is_owned_by_the_policy_and_rbac_is_least_privilege() -> None:
    p = policy(target={"type": "duckdb", "duckdb": {"storage": {"size": "5Gi", "storageClassName": "fast"}}})
    objs = rendering.owned_objects(p, "img")
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Deployment"]
    for o in objs:
        assert o["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "datasync.dev/v1alpha1",
                "kind": "SyncPolicy",
                "name": "shop",
                "uid": "1234-abcd",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert o["metadata"]["labels"][naming.POLICY_LABEL] == "shop"
    pvc = objs[3]
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }
    role = objs[1]
    verbs = {(g, r, tuple(rule.get("resourceNames", ()))): rule["verbs"] for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
    assert verbs == {
        ("datasync.dev", "syncpolicies", ("shop",)): ["get"],
        ("datasync.dev", "synctables", ()): ["get", "list", "watch"],
        ("datasync.dev", "synctables/status", ()): ["get", "patch"],
        ("datasync.dev", "consistencychecks", ()): ["get", "list", "watch"],
        ("datasync.dev", "consistencychecks/status", ()): ["get", "patch"],
    }
    binding = objs[2]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "datasync-shop"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "datasync-shop", "namespace": "analytics"}]
    assert "uri" not in json.dumps(objs[:4])  # only the Deployment refers to the Secret


def test_operator_holds_every_permission_it_grants_writers() -> None:
    """RBAC refuses to create a Role granting more than its creator has (without escalate)."""
    cluster_role = yaml.safe_load((REPO / "manifests/rbac/cluster_role.yaml").read_text())
    held = {
        (g, r, v) for rule in cluster_role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    for rule in rendering.role(policy())["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert (g, r, v) in held, (g, r, v)


def test_worker_refuses_what_the_engine_cannot_do_yet() -> None:
    def table(**spec: Any) -> SyncTable:
        return SyncTable.model_validate(
            {"metadata": {"name": "t"}, "spec": {"policyRef": {"name": "shop"}, "source": {"table": "orders"}, **spec}}
        )

    assert tables.unsupported(table()) is None
    assert tables.unsupported(table(target={"schema": "public", "table": "orders"})) is None
    assert "column filter" in (tables.unsupported(table(columns={"exclude": ["x"]})) or "")
    assert "mode batch" in (tables.unsupported(table(mode="batch", schedule="0 3 * * *")) or "")
    assert "target name" in (tables.unsupported(table(target={"schema": "analytics"})) or "")
    assert "deletes: soft" in (tables.unsupported(table(deletes="soft")) or "")
