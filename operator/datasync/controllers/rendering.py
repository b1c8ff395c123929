"""Render the objects a SyncPolicy owns: the writer Deployment, its volume and its identity.

Pure functions from the policy to manifests (plain dicts, applied with server-side apply):
easy to unit-test, and what you read here is exactly what lands in the cluster.

Why these shapes:

* **One writer, ``Recreate``.** DuckDB allows one writer per file (DESIGN.md §5). A rolling
  update would start the new pod while the old one still holds the file lock, so the
  Deployment has one replica (zero while the policy is suspended) and strategy ``Recreate``.
* **The DSN never leaves the Secret.** The container gets ``DATASYNC_SOURCE_DSN`` through
  ``secretKeyRef``; neither the operator nor the Deployment ever holds the value.
* **Restricted Pod Security.** Non-root (uid/gid 10001, as in the Dockerfile), no privilege
  escalation, every capability dropped, RuntimeDefault seccomp, read-only root file system.
  Writable places are volumes: the DuckDB directory (the PersistentVolumeClaim; ``fsGroup``
  makes it writable) and ``/tmp`` (an emptyDir; ``HOME`` points there for DuckDB's own files).
* **Probes** hit the worker's tiny HTTP server: ``/healthz`` (the process and its sync loop
  are alive) for liveness, ``/readyz`` (the engine runs, or there is nothing to run) for
  readiness.
* **Least privilege for the worker.** Its own ServiceAccount and a Role that can read its
  SyncPolicy (by name) and the namespace's SyncTables and write SyncTable status — nothing else.
* **Owner references** make everything here garbage when the SyncPolicy is deleted (the
  kube-controller-manager's garbage collector removes them; the PVC and so the DuckDB file go
  with the policy: delete the policy only when the copy is no longer wanted).
"""

from __future__ import annotations

import posixpath
from typing import Any

from datasync.api import API_VERSION, SyncPolicy
from datasync.controllers import naming

Manifest = dict[str, Any]

HEALTH_PORT = 8080
RUN_AS = 10001
DATA_VOLUME = "data"
TMP_VOLUME = "tmp"
CONTAINER = "writer"


def owner_reference(policy: SyncPolicy) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "SyncPolicy",
        "name": policy.metadata.name,
        "uid": policy.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(policy: SyncPolicy, name: str) -> dict[str, Any]:
    policy_name = policy.metadata.name or ""
    return {
        "name": name,
        "namespace": policy.metadata.namespace,
        "labels": naming.labels(policy_name),
        "ownerReferences": [owner_reference(policy)],
    }


def target_path(policy: SyncPolicy) -> str:
    """Path of the DuckDB file inside the writer pod."""
    return policy.spec.target.duckdb_settings().path


def service_account(policy: SyncPolicy) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(policy, naming.writer_name(policy.metadata.name or "")),
    }


def role(policy: SyncPolicy) -> Manifest:
    """What the writer may do: read its policy and the tables, report table status."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(policy, naming.writer_name(policy.metadata.name or "")),
        "rules": [
            {
                "apiGroups": ["datasync.dev"],
                "resources": ["syncpolicies"],
                "resourceNames": [policy.metadata.name],
                "verbs": ["get"],
            },
            {"apiGroups": ["datasync.dev"], "resources": ["synctables"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["datasync.dev"], "resources": ["synctables/status"], "verbs": ["get", "patch"]},
            # the writer runs the policy's consistency checks (it alone can read the DuckDB file)
            {"apiGroups": ["datasync.dev"], "resources": ["consistencychecks"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["datasync.dev"], "resources": ["consistencychecks/status"], "verbs": ["get", "patch"]},
        ],
    }


def role_binding(policy: SyncPolicy) -> Manifest:
    name = naming.writer_name(policy.metadata.name or "")
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(policy, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": policy.metadata.namespace}],
    }


def volume_claim(policy: SyncPolicy) -> Manifest:
    storage = policy.spec.target.duckdb_settings().storage
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(storage.size)}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(policy, naming.volume_claim_name(policy.metadata.name or "")),
        "spec": spec,
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def worker_command(policy: SyncPolicy) -> tuple[list[str], list[str]]:
    """(command, args) of the writer container."""
    return ["datasync"], [
        "--log-level=INFO",
        "worker",
        f"--policy={policy.metadata.name}",
        f"--namespace={policy.metadata.namespace}",
    ]


def deployment(policy: SyncPolicy, image: str) -> Manifest:
    """The writer: one pod that owns the DuckDB file and runs snapshot + CDC for every SyncTable."""
    name = policy.metadata.name or ""
    spec = policy.spec
    duck = spec.target.duckdb_settings()
    secret = spec.source.secret_ref
    command, args = worker_command(policy)
    env: list[dict[str, Any]] = [
        {"name": "DATASYNC_SOURCE_DSN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}},
        {"name": "DATASYNC_HEALTH_ADDRESS", "value": f"0.0.0.0:{HEALTH_PORT}"},
        {"name": "HOME", "value": "/tmp"},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": env,
        "ports": [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        # A first snapshot of a big table keeps the writer busy but its HTTP thread answers.
        "startupProbe": _probe("/healthz", 5, 60),
        "livenessProbe": _probe("/healthz", 10, 6),
        "readinessProbe": _probe("/readyz", 5, 3),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": DATA_VOLUME, "mountPath": posixpath.dirname(duck.path)},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }
    if spec.resources is not None:
        container["resources"] = spec.resources.model_dump(mode="json", exclude_none=True)
    selector = naming.selector_labels(name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(policy, naming.writer_name(name)),
        "spec": {
            "replicas": 0 if spec.suspend else 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": naming.labels(name)},
                "spec": {
                    "serviceAccountName": naming.writer_name(name),
                    "automountServiceAccountToken": True,
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {
                            "name": DATA_VOLUME,
                            "persistentVolumeClaim": {"claimName": naming.volume_claim_name(name)},
                        },
                        {"name": TMP_VOLUME, "emptyDir": {}},
                    ],
                },
            },
        },
    }


def owned_objects(policy: SyncPolicy, image: str) -> list[Manifest]:
    """Everything a duckdb-target policy owns, in apply order (identity before the pod that uses it)."""
    return [
        service_account(policy),
        role(policy),
        role_binding(policy),
        volume_claim(policy),
        deployment(policy, image),
    ]
