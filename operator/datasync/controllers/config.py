"""Operator settings, read once from the environment (the operator Deployment sets them).

Environment, not flags, because that is what a Helm chart or kustomize overlay patches most
easily and what ``kubectl set env`` changes:

``DATASYNC_WORKER_IMAGE``
    Image of the writer Deployments (a SyncPolicy's ``spec.image`` wins). Normally the
    operator's own image: one image holds both commands.
``DATASYNC_NAMESPACES``
    Comma-separated namespaces (globs allowed) to watch; empty or unset: the whole cluster.
``DATASYNC_RESYNC_SECONDS``
    How often each SyncPolicy is reconciled again and its status refreshed (slot lag, tables).
``DATASYNC_RELEASE_TIMEOUT_SECONDS``
    How long a deleted SyncTable waits for the writer to let go of its DuckDB table before
    the operator removes it from the publication anyway (the writer may be down for good).
``DATASYNC_PEERING``
    Name of the ClusterKopfPeering (or KopfPeering in namespaced mode) that keeps two operator
    replicas from acting at once; ``DATASYNC_STANDALONE=true`` runs without peering (one
    replica only, e.g. a developer's laptop).
``DATASYNC_HEALTH_ADDRESS``
    ``host:port`` of the liveness endpoint (``/healthz``).
"""

from __future__ import annotations

import dataclasses
import os

DEFAULT_WORKER_IMAGE = "datasync:0.1.0"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclasses.dataclass(frozen=True)
class Settings:
    worker_image: str = DEFAULT_WORKER_IMAGE
    namespaces: tuple[str, ...] = ()
    resync_seconds: float = 30.0
    release_timeout_seconds: float = 300.0
    peering: str = "datasync"
    standalone: bool = False
    health_address: str = "0.0.0.0:8080"

    @classmethod
    def from_environment(cls) -> Settings:
        spaces = tuple(n.strip() for n in os.environ.get("DATASYNC_NAMESPACES", "").split(",") if n.strip())
        return cls(
            worker_image=os.environ.get("DATASYNC_WORKER_IMAGE", "").strip() or DEFAULT_WORKER_IMAGE,
            namespaces=spaces,
            resync_seconds=_float("DATASYNC_RESYNC_SECONDS", 30.0),
            release_timeout_seconds=_float("DATASYNC_RELEASE_TIMEOUT_SECONDS", 300.0),
            peering=os.environ.get("DATASYNC_PEERING", "").strip() or "datasync",
            standalone=os.environ.get("DATASYNC_STANDALONE", "").strip().lower() in ("1", "true", "yes"),
            health_address=os.environ.get("DATASYNC_HEALTH_ADDRESS", "").strip() or "0.0.0.0:8080",
        )


#: The settings of this process; handlers read it (set by :func:`datasync.controllers.operating.run`).
current = Settings.from_environment()
