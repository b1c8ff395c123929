"""What the writer reads from its SyncTables: the batch size of its one change stream."""

from __future__ import annotations

from typing import Any

from datasync.working import tables


def table(name: str, batch_size: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"policyRef": {"name": "shop"}, "source": {"table": name}}
    if batch_size is not None:
        spec["batchSize"] = batch_size
    return {"apiVersion": "datasync.dev/v1alpha1", "kind": "SyncTable",
            "metadata": {"name": name, "namespace": "ns", "generation": 1}, "spec": spec}  # fmt: skip


def test_a_table_without_its_own_batch_size_takes_the_policys() -> None:
    runnable = [tables.wanted(table("orders")), tables.wanted(table("customers"))]
    assert tables.batch_changes(50_000, runnable) == 50_000


def test_the_smallest_batch_size_any_table_asks_for_applies_to_the_stream() -> None:
    runnable = [tables.wanted(table("orders", 5_000)), tables.wanted(table("customers", 200_000)),
                tables.wanted(table("items"))]  # fmt: skip
    assert tables.wanted(table("orders", 5_000)).batch_size == 5_000
    assert tables.batch_changes(50_000, runnable) == 5_000
    # a table's own size overrides the policy's, larger too, unless another table asks for less
    assert tables.batch_changes(50_000, [tables.wanted(table("customers", 200_000))]) == 200_000
    assert tables.batch_changes(50_000, [tables.wanted(table("customers", 200_000)), tables.wanted(table("items"))]) == 50_000
    assert tables.batch_changes(50_000, []) == 50_000
