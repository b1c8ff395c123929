"""The CRDs in crds/ are the models' rendering, and the models validate like the apiserver.

The real-apiserver half of these checks is tests/e2e/test_crds.py; its tables of refused
resources are reused here, so a CEL rule and its Python twin cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from datasync.api import (
    ConsistencyCheck,
    ConsistencyCheckSpec,
    SyncPolicy,
    SyncPolicySpec,
    SyncTable,
    SyncTableSpec,
    SyncTableStatus,
    get_condition,
    set_condition,
    transition_errors,
)
from datasync.api.__main__ import main as generator_main
from datasync.api.common import ApiModel, Quantity, parse_quantity, quantity_bytes
from datasync.api.generating import COMMAND, KINDS, KUSTOMIZATION, GenerationError, drift, openapi_schema, render
from tests.e2e.test_crds import IMMUTABLE, INVALID, Invalid, sync_policy, sync_table

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
EXAMPLES = REPO / "manifests" / "examples"
MODELS: dict[str, type[BaseModel]] = {"SyncPolicy": SyncPolicy, "SyncTable": SyncTable, "ConsistencyCheck": ConsistencyCheck}


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd_docs() -> dict[str, dict[str, Any]]:
    return {info.kind: load(CRDS / info.filename)[0] for info in KINDS}


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += walk(sub, f"{path}.{name}")
    if "items" in node:
        out += walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{*}}")
    return out


# --------------------------------------------------------------------------- generated files


def test_checked_in_crds_match_the_models() -> None:
    problems = drift(CRDS)
    assert not problems, (
        f"crds/ is out of date with operator/datasync/api: run `{COMMAND} --output crds` (make crds) "
        "and commit the result.\n" + "\n".join(problems)
    )


def test_generation_is_deterministic() -> None:
    assert render() == render()


def test_check_mode_of_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generator_main(["--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(render())
    assert generator_main(["--output", str(tmp_path), "--check"]) == 0
    target = tmp_path / KINDS[0].filename
    target.write_text(target.read_text().replace("minimum: 1\n", "minimum: 2\n", 1))
    (tmp_path / "datasync.dev_widgets.yaml").write_text("stale: true\n")
    assert generator_main(["--output", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "minimum: 2" in err and "stale" in err and "out of date" in err
    assert generator_main(["--output", str(tmp_path)]) == 0
    assert not (tmp_path / "datasync.dev_widgets.yaml").exists()
    assert drift(tmp_path) == []


def test_kustomization_lists_every_crd() -> None:
    doc = yaml.safe_load((CRDS / KUSTOMIZATION).read_text())
    assert doc["resources"] == sorted(info.filename for info in KINDS)
    pointer = yaml.safe_load((REPO / "manifests" / "crds" / "kustomization.yaml").read_text())
    assert pointer["resources"] == ["../../crds"]


def test_crd_identity() -> None:
    expected = {
        "SyncPolicy": ("syncpolicies", ["sp"]),
        "SyncTable": ("synctables", ["st"]),
        "ConsistencyCheck": ("consistencychecks", ["cc"]),
    }
    for kind, doc in crd_docs().items():
        plural, short = expected[kind]
        assert doc["metadata"]["name"] == f"{plural}.datasync.dev"
        spec = doc["spec"]
        assert spec["group"] == "datasync.dev" and spec["scope"] == "Namespaced"
        assert spec["names"] == {
            "kind": kind,
            "listKind": f"{kind}List",
            "plural": plural,
            "singular": plural[:-3] + "y" if plural.endswith("ies") else plural[:-1],
            "shortNames": short,
            "categories": ["datasync"],
        }
        (version,) = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    def columns(kind: str, wide: bool = False) -> list[tuple[str, str]]:
        cols = crd_docs()[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
        return [(c["name"], c["jsonPath"]) for c in cols if wide or not c.get("priority")]

    ready = '.status.conditions[?(@.type=="Ready")].status'
    age = ("Age", ".metadata.creationTimestamp")
    assert columns("SyncTable") == [
        ("Policy", ".spec.policyRef.name"), ("Mode", ".spec.mode"), ("Ready", ready),
        ("Rows", ".status.rows"), ("Lag", ".status.lagSeconds"), age,
    ]  # fmt: skip
    assert columns("SyncPolicy") == [
        ("Tables", ".status.tables"), ("Workers", ".status.workers"), ("Slot Lag", ".status.slotLagBytes"), ("Ready", ready), age,
    ]  # fmt: skip
    assert columns("ConsistencyCheck") == [
        ("Score", ".status.score"), ("Consistent", ".status.consistent"), ("Last Run", ".status.lastRun"), age,
    ]  # fmt: skip
    # Every column points at a field the schema has.
    for kind, doc in crd_docs().items():
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        paths = {p for p, _ in walk(schema)}
        for name, json_path in columns(kind, wide=True):
            field_path = json_path.split("[")[0]
            assert field_path in paths or field_path == ".metadata.creationTimestamp", (kind, name, json_path)


def test_schemas_are_structural_and_documented() -> None:
    for kind, doc in crd_docs().items():
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["metadata"] == {"type": "object"}
        assert schema["required"] == ["spec"]
        for path, node in walk(schema):
            where = f"{kind}{path}"
            assert not {"$ref", "$defs", "title", "allOf", "oneOf", "const", "nullable"} & set(node), where
            assert node.get("additionalProperties") is not False, where
            if node.get("x-kubernetes-int-or-string"):
                assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], where
            else:
                assert "anyOf" not in node and node.get("type") in {
                    "object",
                    "array",
                    "string",
                    "integer",
                    "number",
                    "boolean",
                }, where
            if path and path != ".metadata" and not path.endswith("[*]") and not path.endswith("{*}"):
                assert node.get("description"), f"{where} has no description"


def test_cel_costs_are_bounded() -> None:
    """Strings carry maxLength (or an enum/format) and lists maxItems, so the apiserver can bound CEL costs."""
    for kind, doc in crd_docs().items():
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in walk(schema):
            where = f"{kind}{path}"
            if node.get("type") == "array":
                assert "maxItems" in node, f"{where}: no maxItems"
            if node.get("type") == "string" and path not in {".apiVersion", ".kind"}:
                assert "maxLength" in node or "enum" in node or node.get("format") == "date-time", f"{where}: no maxLength"
            if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
                assert "maxProperties" in node, f"{where}: no maxProperties"


def test_every_cel_rule_has_a_message() -> None:
    rules = 0
    for doc in crd_docs().values():
        for _, node in walk(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
            for rule in node.get("x-kubernetes-validations", []):
                rules += 1
                assert rule["rule"] and len(rule["message"]) > 20, rule
    assert rules >= 15


def test_defaults_in_the_crd_are_the_model_defaults() -> None:
    spec = crd_docs()["SyncPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = SyncPolicySpec.model_validate({"source": {"secretRef": {"name": "pg"}}}).model_dump(mode="json", exclude_none=True)
    for section in ("defaults", "workers", "breaker", "retry", "alerts", "dualWrite", "deadLetterQueue", "target"):
        assert spec["properties"][section]["default"] == model[section], section
    assert model["defaults"] == {"strategy": "hybrid", "consistencyLevel": "eventual", "batchSize": 50000, "maxBatchSeconds": 1.0}
    table = crd_docs()["SyncTable"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert (table["mode"]["default"], table["deletes"]["default"], table["reclaimPolicy"]["default"]) == (
        "cdc",
        "apply",
        "retain",
    )
    assert table["source"]["properties"]["schema"]["default"] == "public"


def test_generator_refuses_what_kubernetes_cannot_express() -> None:
    from dataclasses import replace

    from pydantic import Field, create_model

    from datasync.api.synctables import CRD

    class Union(ApiModel):
        """Not structural."""

        value: int | str = Field(description="int or str, without int-or-string")

    class Undocumented(ApiModel):
        """A field without description."""

        value: int = 0

    for bad_spec, error in ((Union, "unions are not structural"), (Undocumented, "no description")):
        Bad = create_model("Bad", __base__=SyncTable, spec=(bad_spec, Field(description="bad")))
        with pytest.raises(GenerationError, match=error):
            openapi_schema(replace(CRD, model=Bad))


# --------------------------------------------------------------------------- examples


def example_docs() -> list[dict[str, Any]]:
    return [d for path in sorted(EXAMPLES.glob("*.yaml")) for d in load(path)]


def test_examples_validate_with_the_models() -> None:
    docs = example_docs()
    resources = [MODELS[d["kind"]].model_validate(d) for d in docs if d["kind"] in MODELS]
    assert len(resources) == 4
    tables = {t.metadata.name: t for t in resources if isinstance(t, SyncTable)}
    assert tables["orders"].spec.mode == "cdc"
    assert tables["products"].spec.mode == "batch" and tables["products"].spec.schedule
    (secret,) = (d for d in docs if d["kind"] == "Secret")
    assert "CHANGE-ME" in secret["stringData"]["dsn"], "the example Secret must hold an obvious placeholder"
    # Every reference in the examples resolves within the examples.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for r in resources:
        spec = r.spec  # type: ignore[attr-defined]
        if isinstance(r, SyncPolicy):
            assert ("Secret", r.spec.source.secret_ref.name) in names
        else:
            assert ("SyncPolicy", spec.policy_ref.name) in names
        if isinstance(r, ConsistencyCheck):
            assert {("SyncTable", t) for t in r.spec.tables} <= names


# --------------------------------------------------------------------------- model validation


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_models_refuse_what_the_apiserver_refuses(case: Invalid) -> None:
    with pytest.raises(ValidationError) as err:
        MODELS[case.doc["kind"]].model_validate(case.doc)
    if case.cel_message:
        assert case.cel_message in str(err.value)


@pytest.mark.parametrize("case", IMMUTABLE, ids=[c.id for c in IMMUTABLE])
def test_transition_rules_have_python_twins(case: Any) -> None:
    model = MODELS[case.before["kind"]]
    after = copy.deepcopy(case.before)
    case.change(after)
    old, new = model.model_validate(case.before), model.model_validate(after)
    assert isinstance(old, ApiModel) and isinstance(new, ApiModel)
    errors = transition_errors(old, new)
    assert any(case.message in e for e in errors), errors
    same = model.model_validate(case.before)
    assert isinstance(same, ApiModel) and transition_errors(old, same) == []


def test_minimal_specs_get_defaults() -> None:
    table = SyncTableSpec.model_validate({"policyRef": {"name": "shop"}, "source": {"table": "Order Items"}})
    assert (table.mode, table.deletes, table.reclaim_policy, table.source.schema_name) == ("cdc", "apply", "retain", "public")
    assert table.model_dump(exclude_none=True)["source"] == {"schema": "public", "table": "Order Items"}
    policy = SyncPolicySpec.model_validate({"source": {"secretRef": {"name": "pg"}}})
    assert policy.source.secret_ref.key == "dsn"
    assert policy.target.type == "duckdb" and policy.target.duckdb_settings().path == "/data/analytics.duckdb"
    assert (policy.workers.min, policy.workers.max, policy.alerts.consistency_score_threshold) == (0, 4, 90.0)
    check = ConsistencyCheckSpec.model_validate({"policyRef": {"name": "shop"}, "tables": ["orders"]})
    assert (check.checks, check.repair, check.history_limit) == (["row_count"], False, 10)


def test_python_names_and_kubernetes_names_both_work() -> None:
    a = SyncTableSpec.model_validate({"policyRef": {"name": "p"}, "source": {"table": "t"}, "reclaimPolicy": "delete"})
    b = SyncTableSpec.model_validate({"policy_ref": {"name": "p"}, "source": {"table": "t"}, "reclaim_policy": "delete"})
    assert a == b and "reclaimPolicy" in a.model_dump()


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ({"workers": {"min": 2, "max": 2}}, True),
        ({"workers": {"min": 3}}, True),
        ({"workers": {"min": 5}}, False),  # max defaults to 4
        ({"workers": {"max": 0}}, False),
        ({"slotName": "shop_cdc_1"}, True),
        ({"slotName": "Shop-CDC"}, False),
        ({"target": {"type": "duckdb", "duckdb": {"path": "relative.duckdb"}}}, False),
        ({"target": {"type": "duckdb", "duckdb": {"path": "/data/x.duckdb", "storage": {"size": "1Ti"}}}}, True),
        ({"target": {"type": "duckdb", "duckdb": {"storage": {"size": "lots"}}}}, False),
        ({"target": {"type": "ducklake", "ducklake": {"catalogSecretRef": {"name": "lake"}, "dataPath": "s3://b/p/"}}}, True),
        ({"target": {"type": "duckdb", "ducklake": {"catalogSecretRef": {"name": "lake"}, "dataPath": "s3://b/"}}}, False),
        ({"defaults": {"strategy": "recovery", "consistencyLevel": "strong"}}, True),
        ({"defaults": {"strategy": "sometimes"}}, False),
        ({"defaults": {"batchSize": 0}}, False),
        ({"alerts": {"consistencyScoreThreshold": 100}}, True),
        ({"alerts": {"consistencyScoreThreshold": -1}}, False),
        ({"resources": {"limits": {"memory": "4Gi", "cpu": 2}}}, True),
    ],
)
def test_sync_policy_spec_validation(spec: dict[str, Any], ok: bool) -> None:
    doc = {"source": {"secretRef": {"name": "pg"}}, **spec}
    if ok:
        SyncPolicySpec.model_validate(doc)
    else:
        with pytest.raises(ValidationError):
            SyncPolicySpec.model_validate(doc)


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ({"mode": "hybrid", "schedule": "*/15 * * * *"}, True),
        ({"mode": "hybrid"}, False),
        ({"key": ["id"], "columns": {"include": ["id", "total"]}}, True),
        ({"key": ["id"], "columns": {"include": ["total"]}}, False),
        ({"columns": {"include": []}}, False),
        ({"key": []}, False),
        ({"source": {"schema": "Sales Dept", "table": "Order Items"}}, True),
        ({"source": {"table": ""}}, False),
        ({"source": {"table": "x" * 64}}, False),
        ({"deletes": "soft"}, True),
        ({"deletes": "archive"}, False),
        ({"policyRef": {"name": "Shop"}}, False),
    ],
)
def test_sync_table_spec_validation(spec: dict[str, Any], ok: bool) -> None:
    doc = {"policyRef": {"name": "shop"}, "source": {"table": "orders"}, **spec}
    if ok:
        SyncTableSpec.model_validate(doc)
    else:
        with pytest.raises(ValidationError):
            SyncTableSpec.model_validate(doc)


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ({"checks": ["row_count", "data_hash", "referential_integrity"]}, True),
        ({"checks": []}, False),
        ({"checks": ["row_count", "row_count"]}, False),
        ({"tables": []}, False),
        ({"checks": ["business_rules"], "rules": [{"name": "positive", "sql": "SELECT 1 WHERE false"}]}, True),
        ({"checks": ["business_rules"], "rules": [{"name": "a", "sql": "SELECT 1"}, {"name": "a", "sql": "SELECT 2"}]}, False),
        ({"rules": [{"name": "a", "sql": "SELECT 1"}]}, False),
        ({"historyLimit": 0}, False),
        ({"historyLimit": 101}, False),
        ({"schedule": "@hourly", "repair": True}, True),
    ],
)
def test_consistency_check_spec_validation(spec: dict[str, Any], ok: bool) -> None:
    doc = {"policyRef": {"name": "shop"}, "tables": ["orders"], **spec}
    if ok:
        ConsistencyCheckSpec.model_validate(doc)
    else:
        with pytest.raises(ValidationError):
            ConsistencyCheckSpec.model_validate(doc)


@pytest.mark.parametrize(
    "schedule",
    ["0 3 * * *", "*/5 * * * *", "0 0-6/2 1,15 * MON-FRI", "30 4 * JAN sun", "0  3 * * ?", "@daily", "@every 1h30m", "@yearly"],
)
def test_good_schedules(schedule: str) -> None:
    sync_table_spec = {"policyRef": {"name": "p"}, "source": {"table": "t"}, "mode": "batch", "schedule": schedule}
    SyncTableSpec.model_validate(sync_table_spec)


@pytest.mark.parametrize(
    "schedule",
    ["", "daily", "0 3 * *", "0 3 * * * *", "every day at 3", "@fortnightly", "@every", "0 3 * * * ; rm -rf /", "0 3 \t* * *"],
)
def test_bad_schedules(schedule: str) -> None:
    with pytest.raises(ValidationError):
        SyncTableSpec.model_validate(
            {"policyRef": {"name": "p"}, "source": {"table": "t"}, "mode": "batch", "schedule": schedule}
        )


@pytest.mark.parametrize(
    ("quantity", "value"),
    [(1024, 1024), ("1Ki", 1024), ("1Gi", 2**30), ("1.5G", 1_500_000_000), ("500m", 1), ("1e3", 1000), ("10", 10)],
)
def test_quantities(quantity: Quantity, value: int) -> None:
    assert quantity_bytes(quantity) == value
    assert parse_quantity("250m") * 4 == 1


def test_conditions_keep_their_transition_time() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    conditions = set_condition(None, "Ready", "False", "Snapshotting", "copying", observed_generation=1, now=t0)
    conditions = set_condition(
        conditions, "Ready", "False", "Snapshotting", "50%", observed_generation=2, now=t0 + timedelta(minutes=1)
    )
    ready = get_condition(conditions, "Ready")
    assert ready is not None and ready.last_transition_time == t0 and ready.message == "50%" and ready.observed_generation == 2
    conditions = set_condition(conditions, "Ready", "True", "Streaming", now=t0 + timedelta(minutes=2))
    conditions = set_condition(conditions, "Snapshotted", "True", "Done", now=t0 + timedelta(minutes=2))
    assert [c.type for c in conditions] == ["Ready", "Snapshotted"]
    ready = get_condition(conditions, "Ready")
    assert ready is not None and ready.last_transition_time == t0 + timedelta(minutes=2)
    status = SyncTableStatus(conditions=conditions, rows=10, last_applied_lsn="16/B374D848")
    dumped = status.model_dump(mode="json", exclude_none=True)
    assert dumped["conditions"][0]["lastTransitionTime"] == "2030-01-01T00:02:00Z"
    assert dumped["lastAppliedLSN"] == "16/B374D848"
    assert SyncTableStatus.model_validate({**dumped, "fieldFromTheFuture": 1}) == status  # status tolerates new fields


def test_bad_condition_reason_is_refused() -> None:
    with pytest.raises(ValidationError):
        set_condition(None, "Ready", "True", "not a reason")


def test_shared_case_builders_are_valid() -> None:
    """The e2e tables start from valid resources: only the stated change makes them invalid."""
    SyncPolicy.model_validate(sync_policy("base"))
    SyncTable.model_validate(sync_table("base"))
