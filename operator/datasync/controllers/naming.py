"""Names and labels the operator derives from a SyncPolicy.

Why derived and not stored: every party (the operator, the worker, a human with kubectl or
psql) can compute them from the policy alone, so nothing depends on a status field having
been written first. The slot and the publication default to ``datasync_<namespace>_<name>``
(lower case, ``[a-z0-9_]``, at most 63 bytes; a hash keeps long names unique), so two
policies never share a slot, even across namespaces, and a DBA can tell whose slot it is.
"""

from __future__ import annotations

import hashlib
import re

from datasync.api import SyncPolicy

MAX_PG_NAME = 63

#: Label put on every object the operator renders for a policy.
POLICY_LABEL = "datasync.dev/policy"


def _pg_name(*parts: str) -> str:
    raw = "_".join(["datasync", *parts])
    name = re.sub(r"[^a-z0-9_]", "_", raw.lower())
    if len(name) <= MAX_PG_NAME:
        return name
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"{name[: MAX_PG_NAME - 9]}_{digest}"


def slot_name(policy: SyncPolicy) -> str:
    """The policy's logical replication slot."""
    return policy.spec.slot_name or _pg_name(policy.metadata.namespace or "", policy.metadata.name or "")


def publication_name(policy: SyncPolicy) -> str:
    """The policy's publication (the slot's name unless set)."""
    return policy.spec.publication_name or slot_name(policy)


def writer_name(policy_name: str) -> str:
    """Deployment, ServiceAccount, Role and RoleBinding of the policy's writer."""
    return f"datasync-{policy_name}"


def volume_claim_name(policy_name: str) -> str:
    """PersistentVolumeClaim holding the policy's DuckDB file."""
    return f"datasync-{policy_name}-data"


def labels(policy_name: str) -> dict[str, str]:
    """Recommended labels (app.kubernetes.io/*) plus the policy label, on every rendered object."""
    return {
        "app.kubernetes.io/name": "datasync",
        "app.kubernetes.io/instance": policy_name,
        "app.kubernetes.io/component": "writer",
        "app.kubernetes.io/managed-by": "datasync-operator",
        POLICY_LABEL: policy_name,
    }


def selector_labels(policy_name: str) -> dict[str, str]:
    """The subset of :func:`labels` that selects the writer's pods (immutable in a Deployment)."""
    return {"app.kubernetes.io/name": "datasync", "app.kubernetes.io/component": "writer", POLICY_LABEL: policy_name}
