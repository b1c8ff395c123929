"""Which SyncTables the writer runs, read from the API.

The engine today copies a PostgreSQL ``schema.table`` to the same ``schema.table`` in DuckDB
with every column, keyed by the source's primary key or replica identity, deletes applied,
in CDC mode. A SyncTable asking for more (another target name, a column filter, its own key,
soft or ignored deletes, batch or hybrid mode) is not silently synced differently from what
it says: it is reported ``Degraded`` with reason ``Unsupported`` and left out until the engine
grows the feature.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from datasync import identifiers
from datasync.api import SyncTable


@dataclasses.dataclass(frozen=True)
class Wanted:
    """One SyncTable as the writer sees it."""

    name: str
    source: identifiers.TableName
    generation: int
    reclaim_policy: str
    deleting: bool
    unsupported: str | None
    status: dict[str, Any]
    batch_size: int | None = None  # the table's own spec.batchSize, if any

    @property
    def key(self) -> tuple[str, int]:
        """What a running engine depends on: restart when it changes."""
        return self.name, self.generation


def unsupported(table: SyncTable) -> str | None:
    """Why the engine cannot run ``table`` as specified yet, or None."""
    spec = table.spec
    problems = []
    if spec.mode != "cdc":
        problems.append(f"mode {spec.mode}")
    target = spec.target
    if target is not None and (
        (target.schema_name or spec.source.schema_name) != spec.source.schema_name
        or (target.table or spec.source.table) != spec.source.table
    ):
        problems.append("a target name different from the source name")
    if spec.columns is not None:
        problems.append("a column filter")
    if spec.key is not None:
        problems.append("an explicit key (the source's primary key or replica identity is used)")
    if spec.deletes != "apply":
        problems.append(f"deletes: {spec.deletes}")
    if not problems:
        return None
    return "not supported by the engine yet: " + ", ".join(problems)


def wanted(obj: dict[str, Any]) -> Wanted:
    table = SyncTable.model_validate(obj)
    return Wanted(
        name=table.metadata.name or "",
        source=identifiers.TableName(table.spec.source.schema_name, table.spec.source.table),
        generation=table.metadata.generation or 0,
        reclaim_policy=table.spec.reclaim_policy,
        deleting=bool(obj["metadata"].get("deletionTimestamp")),
        unsupported=unsupported(table),
        status=dict(obj.get("status") or {}),
        batch_size=table.spec.batch_size,
    )


def batch_changes(default: int, runnable: list[Wanted]) -> int:
    """The batch size of the writer's one change stream: the smallest any of its tables asks for.

    Each table asks for its own ``batchSize``, else the policy's ``default``. One stream
    applies all of a policy's tables, in batches that span them (a transaction may touch
    several), so a table cannot have batches of its own: one that asks for smaller ones gets
    them, and so do the others (no table gets batches larger than it asked for).
    """
    return min((default if w.batch_size is None else w.batch_size for w in runnable), default=default)
