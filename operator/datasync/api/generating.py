"""Turn the pydantic models into CustomResourceDefinitions, one YAML file per kind.

Why a converter and not pydantic's JSON schema as is: pydantic emits JSON Schema 2020-12 with
``$defs``/``$ref``, ``anyOf [X, null]`` for optional fields, titles and
``additionalProperties: false``. The apiserver wants a *structural* OpenAPI v3 schema: no
references, a ``type`` on every node, no unions (int-or-string aside), and it refuses
``additionalProperties: false`` (it prunes unknown fields instead). So this module inlines
references (a field's description wins over its model's docstring, CEL rules of both are
kept), turns ``Optional[X]`` into ``X`` (absent means unset; nullable is not needed), drops
titles and refuses any JSON Schema keyword the apiserver does not know, rather than shipping
a CRD that fails at install time.

Nested sections with a ``default_factory`` get their complete default object as ``default``:
the apiserver then fills in the section even when the user leaves it out, so the stored
object shows the effective settings (``kubectl get sp x -o yaml``). A bare ``default: {}``
would not do: the apiserver checks defaults against the CEL rules without applying the
nested defaults first. Fields inside list items get no schema default (absent means the
model's default): a defaulted field inside a list makes client-side ``kubectl apply`` and
GitOps diffs see a change on every sync, because lists are compared whole.

Output is deterministic (sorted schema keys, no YAML anchors, fixed layout) so that
``python -m datasync.api --check`` and the unit tests can demand the checked-in files equal a
fresh rendering.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from datasync.api import consistencychecks, syncpolicies, synctables
from datasync.api.common import CATEGORY, GROUP, VERSION, CrdInfo

KINDS: tuple[CrdInfo, ...] = (syncpolicies.CRD, synctables.CRD, consistencychecks.CRD)
KUSTOMIZATION = "Kustomization"  # no extension: `kubectl apply -f crds/` skips it, `-k crds/` uses it
COMMAND = "python -m datasync.api"

# Keywords of the apiserver's JSONSchemaProps that we emit; anything else is a generator bug.
_ALLOWED = {
    "type", "format", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "minProperties",
    "maxProperties", "required", "properties", "items", "additionalProperties", "anyOf",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-map-type",
}  # fmt: skip
_VALIDATIONS = "x-kubernetes-validations"
_NULL = {"type": "null"}


class GenerationError(RuntimeError):
    """A model cannot be expressed as a structural schema (the message says where and why)."""


class _CrdJsonSchema(GenerateJsonSchema):
    """pydantic's generator, with defaults for ``default_factory`` fields (see the module docstring)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json", by_alias=True, exclude_none=True)
        if value == [] or value == {}:
            return NoDefault
        return value


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """pydantic's (validation) JSON schema of ``model``, Kubernetes field names."""
    return model.model_json_schema(by_alias=True, mode="validation", schema_generator=_CrdJsonSchema)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **override}
    if _VALIDATIONS in base and _VALIDATIONS in override:
        out[_VALIDATIONS] = [*base[_VALIDATIONS], *override[_VALIDATIONS]]
    return out


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    if "$ref" in node:
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _convert(_merge(defs[node["$ref"].rsplit("/", 1)[-1]], rest), defs, path)
    if "allOf" in node and len(node["allOf"]) == 1:
        rest = {k: v for k, v in node.items() if k != "allOf"}
        return _convert(_merge(node["allOf"][0], rest), defs, path)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node["anyOf"] if b != _NULL]
        if len(branches) != 1:
            raise GenerationError(f"{path}: unions are not structural; only Optional[X] and int-or-string are supported")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if "default" in rest and rest["default"] is None:
            del rest["default"]
        return _convert(_merge(branches[0], rest), defs, path)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" or (key == "additionalProperties" and value is False) or (key == "default" and value is None):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _convert(value, defs, f"{path}[*]")
        elif key == "anyOf":
            out[key] = [_convert(sub, defs, path) for sub in value]
        elif key == "required":
            out[key] = sorted(value)
        elif key in _ALLOWED:
            out[key] = value
        else:
            raise GenerationError(f"{path}: JSON Schema keyword {key!r} has no Kubernetes equivalent")
    return out


def _drop_item_defaults(node: dict[str, Any], in_list: bool = False) -> None:
    if in_list:
        node.pop("default", None)
    for sub in node.get("properties", {}).values():
        _drop_item_defaults(sub, in_list)
    if "items" in node:
        _drop_item_defaults(node["items"], True)
    if isinstance(node.get("additionalProperties"), dict):
        _drop_item_defaults(node["additionalProperties"], in_list)


def _check(node: dict[str, Any], path: str, problems: list[str], root: bool = False) -> None:
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: anyOf outside int-or-string")
    for name, sub in node.get("properties", {}).items():
        if not sub.get("description") and not (root and name == "metadata"):
            problems.append(f"{path}.{name}: no description")
        _check(sub, f"{path}.{name}", problems)
    if "items" in node:
        _check(node["items"], f"{path}[*]", problems)
        if node.get("x-kubernetes-list-type") == "map":
            missing = set(node.get("x-kubernetes-list-map-keys", ())) - set(node["items"].get("required", ()))
            if missing:
                problems.append(f"{path}: list map keys {sorted(missing)} must be required")
    if isinstance(node.get("additionalProperties"), dict):
        _check(node["additionalProperties"], f"{path}{{*}}", problems)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def openapi_schema(info: CrdInfo) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of one kind."""
    raw = json_schema(info.model)
    defs = raw.pop("$defs", {})
    schema = _convert(raw, defs, info.kind)
    props = schema["properties"]
    props["apiVersion"] = {
        "type": "string",
        "description": (
            "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
            "recognized schemas to the latest internal value, and may reject unrecognized values."
        ),
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is a string value representing the REST resource this object represents.",
    }
    # The apiserver owns metadata's schema: a CRD may restrict name/generateName, nothing else
    # (not even a description).
    props["metadata"] = {"type": "object"}
    schema["required"] = ["spec"]
    _drop_item_defaults(schema)
    problems: list[str] = []
    _check(schema, info.kind, problems, root=True)
    if problems:
        raise GenerationError(f"{info.kind} schema is not structural:\n  " + "\n  ".join(problems))
    return dict(_sorted(schema))


def crd(info: CrdInfo) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": info.name,
            "labels": {"app.kubernetes.io/name": "datasync", "app.kubernetes.io/part-of": "datasync"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.to_crd() for c in info.printer_columns],
                    "schema": {"openAPIV3Schema": openapi_schema(info)},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):  # type: ignore[misc,unused-ignore]
    """Block style, no anchors/aliases, literal blocks for multi-line strings."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _Block(str):
    """A string written as a literal block: long CEL rules and messages stay on one unfolded line."""

    __slots__ = ()


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value or isinstance(value, _Block) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(_Block, _str)


def _unfold_long_rules(node: Any) -> None:
    if isinstance(node, dict):
        for rule in node.get(_VALIDATIONS, ()):
            for key in ("rule", "message"):
                if len(rule[key]) > 100:
                    rule[key] = _Block(rule[key])
        for value in node.values():
            _unfold_long_rules(value)
    elif isinstance(node, list):
        for value in node:
            _unfold_long_rules(value)


def to_yaml(doc: dict[str, Any]) -> str:
    doc = copy.deepcopy(doc)
    _unfold_long_rules(doc)
    text: str = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)
    return text


def _header(source: str) -> str:
    return f"# Generated by `{COMMAND}` from {source}. Do not edit: change the models and regenerate.\n"


def render() -> dict[str, str]:
    """File name → content of every file in crds/."""
    files = {info.filename: _header(info.model.__module__) + to_yaml(crd(info)) for info in KINDS}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(files),
    }
    files[KUSTOMIZATION] = _header(__name__) + to_yaml(kustomization)
    return files


def write(out_dir: Path) -> list[Path]:
    """Write every file of :func:`render` into ``out_dir``; remove stale generated CRDs. Returns changed paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed: list[Path] = []
    files = render()
    for name, text in files.items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    for stale in out_dir.glob(f"{GROUP}_*.yaml"):
        if stale.name not in files:
            stale.unlink()
            changed.append(stale)
    return changed


def drift(out_dir: Path) -> list[str]:
    """Differences between ``out_dir`` and a fresh rendering, as unified diffs (empty: up to date)."""
    problems: list[str] = []
    files = render()
    for name, text in files.items():
        path = out_dir / name
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), f"{path} (checked in)", f"{name} (models)"
            )
            problems.append("".join(diff) if current else f"{path}: missing")
    for stale in sorted(out_dir.glob(f"{GROUP}_*.yaml")):
        if stale.name not in files:
            problems.append(f"{stale}: not generated by any model (stale)")
    return problems
