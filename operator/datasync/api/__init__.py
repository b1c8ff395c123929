"""The DataSync API: custom resource models, the one source of the CRDs in ``crds/``.

Group ``datasync.dev``, version ``v1alpha1``, namespaced kinds in category ``datasync``:

* :class:`SyncPolicy` (``sp``): a PostgreSQL source, a DuckDB/DuckLake target and the sync settings;
* :class:`SyncTable` (``st``): one source table kept in sync under a policy;
* :class:`ConsistencyCheck` (``cc``): comparisons of copies with their sources, results in status.

The operator parses resources with these models (``SyncTable.model_validate(body)``) and
writes status with ``status.model_dump(mode="json", exclude_none=True)``. The CRD YAML is
generated from them by ``python -m datasync.api`` (see :mod:`datasync.api.generating`).
"""

from datasync.api.common import API_VERSION, CATEGORY, GROUP, VERSION, transition_errors
from datasync.api.conditions import Condition, get_condition, set_condition
from datasync.api.consistencychecks import ConsistencyCheck, ConsistencyCheckSpec, ConsistencyCheckStatus
from datasync.api.syncpolicies import SyncPolicy, SyncPolicySpec, SyncPolicyStatus
from datasync.api.synctables import SyncTable, SyncTableSpec, SyncTableStatus

__all__ = [
    "API_VERSION",
    "CATEGORY",
    "GROUP",
    "VERSION",
    "Condition",
    "ConsistencyCheck",
    "ConsistencyCheckSpec",
    "ConsistencyCheckStatus",
    "SyncPolicy",
    "SyncPolicySpec",
    "SyncPolicyStatus",
    "SyncTable",
    "SyncTableSpec",
    "SyncTableStatus",
    "get_condition",
    "set_condition",
    "transition_errors",
]
