"""The generated CRDs on a real kube-apiserver: they install, the examples apply, bad input is refused.

What only a real apiserver proves: the schemas are structural, every CEL rule compiles and
passes the cost estimate, defaults and rules behave as the models say, kubectl prints the
columns, short names and category, and users get error messages they can act on.

``INVALID`` and ``IMMUTABLE`` are shared with tests/unit/test_crds.py, which checks that the
pydantic models refuse the same resources (with the same message where a CEL rule decides).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from datasync.api import API_VERSION, ConsistencyCheckStatus, SyncPolicyStatus, SyncTableStatus, set_condition
from datasync.api.generating import KINDS
from datasync.api.syncpolicies import SyncPolicy
from tests.e2e.cluster import ControlPlane
from tests.e2e.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
EXAMPLES = REPO / "manifests" / "examples"
KUSTOMIZE_CRDS = REPO / "manifests" / "crds"


# --------------------------------------------------------------------------- shared cases


def sync_policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "SyncPolicy",
        "metadata": {"name": name},
        "spec": {"source": {"secretRef": {"name": "shop-postgres"}}, **spec},
    }


def sync_table(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "SyncTable",
        "metadata": {"name": name},
        "spec": {"policyRef": {"name": "shop"}, "source": {"table": "orders"}, **spec},
    }


def consistency_check(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ConsistencyCheck",
        "metadata": {"name": name},
        "spec": {"policyRef": {"name": "shop"}, "tables": ["orders"], **spec},
    }


def _without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    del out["spec"][key]
    return out


@dataclass(frozen=True)
class Invalid:
    """A resource the apiserver must refuse, and fragments of kubectl's error message."""

    id: str
    doc: dict[str, Any]
    stderr: tuple[str, ...]
    cel_message: str | None = None  # set when a CEL rule refuses it: the models raise the same message


INVALID: tuple[Invalid, ...] = (
    Invalid(
        "missing-policy-ref",
        _without(sync_table("missing-policy-ref"), "policyRef"),
        ("spec.policyRef: Required value",),
    ),
    Invalid(
        "bad-mode",
        sync_table("bad-mode", mode="streaming"),
        ('spec.mode: Unsupported value: "streaming"', '"cdc", "batch", "hybrid"'),
    ),
    Invalid(
        "negative-batch-size",
        sync_policy("negative-batch-size", defaults={"batchSize": -5}),
        ("spec.defaults.batchSize", "should be greater than or equal to 1"),
    ),
    Invalid(
        "workers-min-above-max",
        sync_policy("workers-min-above-max", workers={"min": 5, "max": 2}),
        ("spec.workers", "workers.min must be less than or equal to workers.max"),
        "workers.min must be less than or equal to workers.max",
    ),
    Invalid(
        "unknown-check-type",
        consistency_check("unknown-check-type", checks=["row_count", "checksum"]),
        ('spec.checks[1]: Unsupported value: "checksum"', '"row_count", "data_hash", "business_rules", "referential_integrity"'),
    ),
    Invalid(
        "bad-schedule-words",
        sync_table("bad-schedule-words", mode="batch", schedule="every day"),
        ('spec.schedule: Invalid value: "every day"', "must be a cron schedule with 5 fields"),
        "must be a cron schedule with 5 fields",
    ),
    Invalid(
        "bad-schedule-four-fields",
        consistency_check("bad-schedule-four-fields", schedule="0 3 * *"),
        ('spec.schedule: Invalid value: "0 3 * *"', "must be a cron schedule with 5 fields"),
        "must be a cron schedule with 5 fields",
    ),
    Invalid(
        "batch-without-schedule",
        sync_table("batch-without-schedule", mode="batch"),
        ("spec.schedule: Required value", "schedule is required when mode is batch or hybrid"),
        "schedule is required when mode is batch or hybrid",
    ),
    Invalid(
        "schedule-with-cdc",
        sync_table("schedule-with-cdc", schedule="@daily"),
        ("spec.schedule: Forbidden", "schedule applies to batch and hybrid modes only"),
        "schedule applies to batch and hybrid modes only",
    ),
    Invalid(
        "include-and-exclude",
        sync_table("include-and-exclude", columns={"include": ["id", "total"], "exclude": ["notes"]}),
        ("spec.columns", "columns.include and columns.exclude are mutually exclusive"),
        "columns.include and columns.exclude are mutually exclusive",
    ),
    Invalid(
        "key-column-excluded",
        sync_table("key-column-excluded", key=["id"], columns={"exclude": ["id"]}),
        ("spec.columns.exclude", "key columns cannot be excluded"),
        "key columns cannot be excluded",
    ),
    Invalid(
        "duplicate-key-column",
        sync_table("duplicate-key-column", key=["id", "id"]),
        ('spec.key[1]: Duplicate value: "id"',),
    ),
    Invalid(
        "score-threshold-above-100",
        sync_policy("score-threshold-above-100", alerts={"consistencyScoreThreshold": 101}),
        ("spec.alerts.consistencyScoreThreshold", "should be less than or equal to 100"),
    ),
    Invalid(
        "ducklake-without-settings",
        sync_policy("ducklake-without-settings", target={"type": "ducklake"}),
        ("spec.target.ducklake: Required value", "target.ducklake is required when target.type is ducklake"),
        "target.ducklake is required when target.type is ducklake",
    ),
    Invalid(
        "backoff-above-max",
        sync_policy("backoff-above-max", retry={"backoffSeconds": 600, "maxBackoffSeconds": 60}),
        ("spec.retry", "retry.backoffSeconds must not exceed retry.maxBackoffSeconds"),
        "retry.backoffSeconds must not exceed retry.maxBackoffSeconds",
    ),
    Invalid(
        "business-rules-without-rules",
        consistency_check("business-rules-without-rules", checks=["business_rules"]),
        ("spec.rules: Required value", "checks include business_rules but spec.rules is empty"),
        "checks include business_rules but spec.rules is empty",
    ),
    Invalid(
        "foreign-key-column-count",
        consistency_check("foreign-key-column-count", checks=["referential_integrity"], foreignKeys=[
            {"name": "fk", "table": "orders", "columns": ["a", "b"], "references": {"table": "customers", "columns": ["id"]}}
        ]),
        ("spec.foreignKeys[0].columns", "a foreign key needs as many columns as it references"),
        "a foreign key needs as many columns as it references",
    ),
    Invalid(
        "policy-name-too-long",
        sync_policy("p" * 51),
        ("SyncPolicy names are at most 50 characters",),
        "SyncPolicy names are at most 50 characters",
    ),
    Invalid(
        "inline-dsn",
        sync_policy("inline-dsn", source={"dsn": "postgresql://u:secret@db/shop"}),
        ('unknown field "spec.source.dsn"',),
    ),
    Invalid(
        "typo-in-field-name",
        sync_table("typo-in-field-name", colums={"include": ["id"]}),
        ('unknown field "spec.colums"',),
    ),
)


@dataclass(frozen=True)
class Immutable:
    """A resource, then a change to it that the apiserver must refuse."""

    id: str
    before: dict[str, Any]
    change: Callable[[dict[str, Any]], None]
    stderr: tuple[str, ...]
    message: str = field(default="")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return change


IMMUTABLE: tuple[Immutable, ...] = (
    Immutable(
        "source-table",
        sync_table("imm-source-table"),
        _set("spec.source.table", "customers"),
        ("spec.source", "source is immutable"),
        "source is immutable",
    ),
    Immutable(
        "source-schema",
        sync_table("imm-source-schema"),
        _set("spec.source.schema", "archive"),
        ("spec.source", "source is immutable"),
        "source is immutable",
    ),
    Immutable(
        "policy-ref",
        sync_table("imm-policy-ref"),
        _set("spec.policyRef.name", "other"),
        ("spec.policyRef", "policyRef is immutable"),
        "policyRef is immutable",
    ),
    Immutable(
        "slot-name",
        sync_policy("imm-slot-name", slotName="shop_slot"),
        _set("spec.slotName", "another_slot"),
        ("spec.slotName", "slotName is immutable"),
        "slotName is immutable",
    ),
    Immutable(
        "target-type",
        sync_policy("imm-target-type"),
        _set("spec.target", {"type": "ducklake", "ducklake": {"catalogSecretRef": {"name": "lake"}, "dataPath": "s3://b/"}}),
        ("spec.target.type", "target.type is immutable"),
        "target.type is immutable",
    ),
)


# --------------------------------------------------------------------------- helpers



def apply(cp: ControlPlane, namespace: str, doc: dict[str, Any], check: bool = False) -> Any:
    return cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=check)


def get_json(cp: ControlPlane, namespace: str, *args: str) -> Any:
    return json.loads(cp.kubectl("get", "-n", namespace, *args, "-o", "json").stdout)


def example_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def crds(k8s_cluster: ControlPlane) -> ControlPlane:
    """The CRDs installed the documented way (kustomize) and Established."""
    k8s_cluster.kubectl("apply", "-k", str(KUSTOMIZE_CRDS))
    for info in KINDS:
        k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{info.name}", "--timeout=60s")
    return k8s_cluster


@pytest.fixture(scope="module")
def examples_ns(crds: ControlPlane) -> Iterator[str]:
    """A namespace with every example applied."""
    ns = "datasync-examples"
    crds.kubectl("create", "namespace", ns)
    crds.kubectl("apply", "-n", ns, "-f", str(EXAMPLES))
    yield ns


@pytest.fixture(scope="module")
def scratch_ns(crds: ControlPlane) -> str:
    ns = "datasync-invalid"
    crds.kubectl("create", "namespace", ns)
    return ns


# --------------------------------------------------------------------------- tests


def test_crds_are_established_with_names_and_category(crds: ControlPlane) -> None:
    for info in KINDS:
        crd = json.loads(crds.kubectl("get", "crd", info.name, "-o", "json").stdout)
        names = crd["status"]["acceptedNames"]
        assert names["kind"] == info.kind
        assert names["shortNames"] == list(info.short_names)
        assert names["categories"] == ["datasync"]
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert conditions.get("NonStructuralSchema", "False") == "False"
    # `kubectl apply -f crds/` works too: the Kustomization file has no .yaml extension.
    out = crds.kubectl("apply", "-f", str(CRDS)).stdout
    assert out.count("customresourcedefinition.apiextensions.k8s.io/") == len(KINDS)


def test_examples_apply_cleanly(crds: ControlPlane, examples_ns: str) -> None:
    docs = example_docs()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConsistencyCheck", "Secret", "SyncPolicy", "SyncTable", "SyncTable"]
    # Re-applying is a no-op, and server-side apply (list maps, sets) accepts them too.
    # (A Secret with stringData is always "configured": stringData is write-only.)
    out = crds.kubectl("apply", "-n", examples_ns, "-f", str(EXAMPLES)).stdout
    assert out.count(".datasync.dev/") == 4 and out.count(".datasync.dev/") == out.count("unchanged"), out
    crds.kubectl("apply", "--server-side", "--dry-run=server", "-n", examples_ns, "-f", str(EXAMPLES))


def test_apiserver_defaults_equal_model_defaults(crds: ControlPlane, examples_ns: str, scratch_ns: str) -> None:
    """What the apiserver stores is what the operator's models make of the same file."""
    for info in KINDS:
        for doc in (d for d in example_docs() if d["kind"] == info.kind):
            stored = get_json(crds, examples_ns, info.plural, doc["metadata"]["name"])
            parsed = info.model.model_validate(doc)
            assert info.model.model_validate(stored).spec == parsed.spec, doc["metadata"]["name"]  # type: ignore[attr-defined]
            # Defaults are explicit in the stored object (list items aside, see datasync.api.generating).
            assert set(stored["spec"]) == set(parsed.model_dump(mode="json", exclude_none=True)["spec"])
    minimal = sync_policy("minimal")
    apply(crds, scratch_ns, minimal, check=True)
    stored = get_json(crds, scratch_ns, "syncpolicy", "minimal")
    assert stored["spec"] == SyncPolicy.model_validate(minimal).model_dump(mode="json", exclude_none=True)["spec"]
    assert stored["spec"]["defaults"] == {
        "strategy": "hybrid",
        "consistencyLevel": "eventual",
        "batchSize": 50000,
        "maxBatchSeconds": 1.0,
    }


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_resource_is_refused(crds: ControlPlane, scratch_ns: str, case: Invalid) -> None:
    proc = apply(crds, scratch_ns, case.doc)
    assert proc.returncode != 0, f"{case.id} was accepted:\n{proc.stdout}"
    for fragment in case.stderr:
        assert fragment in proc.stderr, f"{fragment!r} not in kubectl's error:\n{proc.stderr}"


@pytest.mark.parametrize("case", IMMUTABLE, ids=[c.id for c in IMMUTABLE])
def test_immutable_field_change_is_refused(crds: ControlPlane, scratch_ns: str, case: Immutable) -> None:
    apply(crds, scratch_ns, case.before, check=True)
    after = copy.deepcopy(case.before)
    case.change(after)
    proc = apply(crds, scratch_ns, after)
    assert proc.returncode != 0, f"changing {case.id} was accepted:\n{proc.stdout}"
    for fragment in case.stderr:
        assert fragment in proc.stderr, f"{fragment!r} not in kubectl's error:\n{proc.stderr}"
    # Mutable fields of the same object still change.
    if case.before["kind"] == "SyncTable":
        apply(crds, scratch_ns, {**case.before, "spec": {**case.before["spec"], "deletes": "soft"}}, check=True)


def _patch_status(cp: ControlPlane, ns: str, resource: str, status: dict[str, Any]) -> None:
    body = json.dumps({"status": status})
    cp.kubectl("patch", resource, "-n", ns, "--subresource=status", "--type=merge", "-p", body)


def _table(cp: ControlPlane, ns: str, *args: str) -> list[list[str]]:
    lines = cp.kubectl("get", "-n", ns, *args).stdout.strip().splitlines()
    return [line.split() for line in lines if line.strip()]


def test_printer_columns_show_model_built_status(crds: ControlPlane, examples_ns: str) -> None:
    ns = examples_ns
    gen = get_json(crds, ns, "synctable", "orders")["metadata"]["generation"]
    conditions = set_condition(None, "Ready", "True", "Streaming", "caught up", observed_generation=gen)
    table_status = SyncTableStatus(
        conditions=conditions,
        observed_generation=gen,
        phase="Streaming",
        rows=1234,
        lag_seconds=0.5,
        last_applied_lsn="0/16B3748",
    )
    _patch_status(crds, ns, "synctable/orders", table_status.model_dump(mode="json", exclude_none=True))
    policy_status = SyncPolicyStatus(
        conditions=conditions, tables=2, workers=1, slot_lag_bytes=4096, slot_name="datasync_shop", phase="Ready"
    )
    _patch_status(crds, ns, "syncpolicy/shop", policy_status.model_dump(mode="json", exclude_none=True))
    check_status = ConsistencyCheckStatus.model_validate(
        {
            "score": 97.5,
            "consistent": False,
            "lastRun": "2030-01-02T03:04:05Z",
            "phase": "Complete",
            "tables": [
                {"table": "orders", "ok": False, "rowCountSource": 10, "rowCountTarget": 9, "mismatches": 1,
                 "mismatchedKeys": ["(42)"], "checks": [{"type": "row_count", "ok": False, "message": "9 != 10"}]},
            ],
            "history": [{"time": "2030-01-02T03:04:05Z", "score": 97.5, "consistent": False}],
        }
    )  # fmt: skip
    _patch_status(crds, ns, "consistencycheck/shop-nightly", check_status.model_dump(mode="json", exclude_none=True))
    # The apiserver kept what the models wrote, and the models read it back unchanged.
    stored = get_json(crds, ns, "synctable", "orders")["status"]
    assert SyncTableStatus.model_validate(stored) == table_status

    rows = _table(crds, ns, "synctables,syncpolicies,consistencychecks")
    headers = [r for r in rows if r[0] == "NAME"]
    assert ["NAME", "POLICY", "MODE", "READY", "ROWS", "LAG", "AGE"] in headers
    assert ["NAME", "TABLES", "WORKERS", "SLOT", "LAG", "READY", "AGE"] in headers  # "SLOT LAG" is one column
    assert ["NAME", "SCORE", "CONSISTENT", "LAST", "RUN", "AGE"] in headers  # "LAST RUN" is one column
    by_name = {r[0]: r for r in rows if r[0] != "NAME"}
    assert by_name["synctable.datasync.dev/orders"][1:6] == ["shop", "cdc", "True", "1234", "0.5"]
    assert by_name["synctable.datasync.dev/products"][1:3] == ["shop", "batch"]
    assert by_name["syncpolicy.datasync.dev/shop"][1:5] == ["2", "1", "4096", "True"]
    assert by_name["consistencycheck.datasync.dev/shop-nightly"][1:3] == ["97.5", "false"]

    wide = _table(crds, ns, "synctables", "-o", "wide")
    assert wide[0] == ["NAME", "POLICY", "SOURCE", "MODE", "PHASE", "READY", "ROWS", "LAG", "AGE"]
    assert ["orders", "shop", "orders", "cdc", "Streaming", "True", "1234", "0.5"] == wide[1][:8]

    # Status is a subresource: a spec apply does not touch it, and the status patch did not bump generation.
    assert get_json(crds, ns, "synctable", "orders")["metadata"]["generation"] == gen


def test_short_names_and_category(crds: ControlPlane, examples_ns: str) -> None:
    def names(*args: str) -> set[str]:
        return set(crds.kubectl("get", "-n", examples_ns, *args, "-o", "name").stdout.split())

    tables = {"synctable.datasync.dev/orders", "synctable.datasync.dev/products"}
    policies = {"syncpolicy.datasync.dev/shop"}
    checks = {"consistencycheck.datasync.dev/shop-nightly"}
    assert names("st") == tables
    assert names("sp") == policies
    assert names("cc") == checks
    assert names("datasync") == tables | policies | checks


def test_kubectl_explain_shows_descriptions(crds: ControlPlane) -> None:
    def explain() -> str:
        proc = crds.kubectl("explain", "synctables.spec.source", check=False)
        return proc.stdout if proc.returncode == 0 else ""

    out = wait_for("the CRD's OpenAPI to be published", explain)
    assert "The PostgreSQL table to copy. Immutable." in out
    assert "Schema of the source table" in out
    mode = crds.kubectl("explain", "syncpolicies.spec.defaults.strategy").stdout
    assert "recovery" in mode and "near_real_time" in mode
