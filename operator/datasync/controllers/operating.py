"""``datasync operator``: kopf with DataSync's settings.

Why these kopf settings:

* **Peering with a random priority.** kopf pauses every operator that sees a peer of higher
  *or equal* priority. Two replicas with the default (equal) priority would both pause; with a
  random priority exactly one — the highest — acts and the others stand by, taking over when
  its keep-alive in the ClusterKopfPeering expires (``lifetime``) or it leaves (it removes
  itself on a clean shutdown). The peering object and its CRD ship in manifests/operator.
  ``DATASYNC_STANDALONE=true`` skips peering; use it only with a single replica.
* **Annotations, not status, for kopf's bookkeeping**, under our own prefix: the status of
  each kind is the API (printer columns, Argo CD health) and holds only DataSync fields.
* **Our own finalizer name** (``datasync.dev/finalizer``), so ``kubectl get -o yaml`` says
  whose finalizer blocks a deletion.
* **Liveness endpoint** (``/healthz``) for the Deployment's probe.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import kopf

from datasync.controllers import config
from datasync.controllers import consistencychecks as _consistencychecks  # noqa: F401  (registers handlers)
from datasync.controllers import syncpolicies as _syncpolicies  # noqa: F401
from datasync.controllers import synctables as _synctables  # noqa: F401

log = logging.getLogger(__name__)

PREFIX = "datasync.dev"
PEERING_LIFETIME = 30


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.peering.lifetime = PEERING_LIFETIME
    settings.peering.stealth = True
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8


def run(settings: config.Settings) -> None:
    """Run the operator until SIGTERM/SIGINT."""
    config.current = settings
    host, _, port = settings.health_address.rpartition(":")
    log.info(
        "starting: %s, worker image %s, peering %s",
        f"namespaces {', '.join(settings.namespaces)}" if settings.namespaces else "cluster-wide",
        settings.worker_image,
        "off (standalone)" if settings.standalone else settings.peering,
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=settings.standalone,
            peering_name=settings.peering,
            priority=random.randint(1, 2**31 - 1),
            liveness_endpoint=f"http://{host or '0.0.0.0'}:{port}/healthz",
        )
    )
