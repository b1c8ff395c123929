"""Building blocks shared by the DataSync custom resources.

Why the CRDs come from pydantic models: the same classes validate a resource in Python
(the operator parses ``spec`` with them, tests validate the examples with them) and, through
:mod:`datasync.api.generating`, become the OpenAPI schema the apiserver enforces. One source,
so the operator never accepts what the apiserver rejects or the other way round.

Conventions used by every kind:

* Python attributes are snake_case, the Kubernetes field names camelCase (aliases); models
  accept both and dump camelCase, ready to be written to the apiserver.
* Every field carries a description: it is what ``kubectl explain`` shows.
* Spec models forbid unknown fields (a typo in an example fails the unit tests, the way
  kubectl's strict field validation fails it on the cluster); status models ignore them, so
  an operator can read status written by a newer one.
* Cross-field rules are :class:`Rule` objects: a CEL expression for the apiserver
  (``x-kubernetes-validations``) plus its Python twin, checked by the model validator.
  Transition rules (``oldSelf``) need the stored object, so their twin runs in
  :func:`transition_errors` instead. Keeping both halves in one object keeps them in step; the
  unit tests check that each rejected example fails in both places.
* Strings carry ``maxLength`` and lists ``maxItems``: the apiserver estimates the worst-case
  cost of every CEL rule from those bounds and refuses a CRD whose rules could be unbounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

GROUP = "datasync.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "datasync"

X_VALIDATIONS = "x-kubernetes-validations"

# --------------------------------------------------------------------------- CEL rules

RuleReason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry and its Python twin.

    ``check(self)`` mirrors a plain rule; ``transition(old, new)`` mirrors a rule that uses
    ``oldSelf`` (the apiserver only evaluates those on update, when both values exist).
    """

    rule: str
    message: str
    check: Callable[[Any], bool] | None = None
    transition: Callable[[Any, Any], bool] | None = None
    field_path: str | None = None
    reason: RuleReason | None = None

    def __post_init__(self) -> None:
        if (self.check is None) == (self.transition is None):
            raise ValueError(f"rule {self.rule!r}: give exactly one of check= or transition=")
        if ("oldSelf" in self.rule) != (self.transition is not None):
            raise ValueError(f"rule {self.rule!r}: transition= is for rules using oldSelf, check= for the others")

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Cel:
    """Annotation attaching a :class:`Rule` to a scalar field type (e.g. a cron string).

    It adds the rule to the field's JSON schema and an after-validator running its twin.
    """

    rule: Rule

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        check, message = self.rule.check, self.rule.message
        assert check is not None, "Cel() annotations take check= rules"

        def validate(value: Any) -> Any:
            if not check(value):
                raise ValueError(message)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        return {**json_schema, X_VALIDATIONS: [*json_schema.get(X_VALIDATIONS, []), self.rule.to_schema()]}


# --------------------------------------------------------------------------- base models


#: Kubernetes names that plain camelCase would get wrong (Python name → field name).
_FIELD_NAMES = {"last_applied_lsn": "lastAppliedLSN", "schema_name": "schema"}


def field_name(python_name: str) -> str:
    """The Kubernetes field name of a model attribute (camelCase, with a few exceptions)."""
    return _FIELD_NAMES.get(python_name) or to_camel(python_name)


class ApiModel(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields rejected, CEL twins run."""

    model_config = ConfigDict(
        alias_generator=field_name,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )

    __cel__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _run_cel_twins(self) -> Self:
        for rule in type(self).__cel__:
            if rule.check is not None and not rule.check(self):
                raise ValueError(rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        if cls.__cel__:
            target = handler.resolve_ref_schema(json_schema)
            target[X_VALIDATIONS] = [rule.to_schema() for rule in cls.__cel__]
        return json_schema


class StatusModel(ApiModel):
    """Base of status models: written by the operator, so unknown (newer) fields are ignored."""

    model_config = ConfigDict(extra="ignore")


def transition_errors(old: ApiModel, new: ApiModel) -> list[str]:
    """Messages of the transition rules (``oldSelf``) that ``old`` → ``new`` breaks.

    Walks nested models present in both, like the apiserver does for object fields.
    """
    errors: list[str] = []
    if type(old) is not type(new):
        return errors
    for rule in type(new).__cel__:
        if rule.transition is not None and not rule.transition(old, new):
            errors.append(rule.message)
    for name in type(new).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, ApiModel) and isinstance(b, ApiModel):
            errors.extend(transition_errors(a, b))
    return errors


# --------------------------------------------------------------------------- scalar types

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

#: Name of an object in the same namespace that may appear in other objects' names (DNS label).
ObjectName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
#: Any Kubernetes object name (DNS subdomain), e.g. a Secret.
SubdomainName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
#: A SQL identifier as stored in the catalog (case and spaces kept; quoting is the engine's job).
SqlName = Annotated[str, Field(min_length=1, max_length=63)]
#: A counter that can exceed 2^31.
Int64 = Annotated[int, Field(ge=0, json_schema_extra={"format": "int64"})]
#: A PostgreSQL WAL position as PostgreSQL prints it, e.g. ``16/B374D848``.
Lsn = Annotated[str, Field(max_length=17, pattern=r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")]


def unique_items(values: list[Any]) -> list[Any]:
    """Validator of list-type set fields: every item at most once."""
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"duplicate entries: {', '.join(duplicates)}")
    return values


#: Schema marker of a list whose items are unique scalars (the apiserver rejects duplicates).
LIST_SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}
#: Column names of one table, each at most once.
ColumnNames = Annotated[list[SqlName], Field(max_length=1600, json_schema_extra=LIST_SET), AfterValidator(unique_items)]
#: Object names (e.g. SyncTables), each at most once.
ObjectNames = Annotated[list[SubdomainName], Field(max_length=100, json_schema_extra=LIST_SET), AfterValidator(unique_items)]

# Kubernetes resource.Quantity (the same pattern controller-gen emits for it).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 10Gi, 500M, 1.5, 250m)")
    return value


#: A Kubernetes quantity: an integer or a string such as ``10Gi``.
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
    AfterValidator(_check_quantity),
]

_SUFFIXES = {
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"),
    "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
}  # fmt: skip


def parse_quantity(value: int | str) -> Decimal:
    """The numeric value of a Kubernetes quantity (``"1Gi"`` → 1073741824)."""
    if isinstance(value, int):
        return Decimal(value)
    _check_quantity(value)
    m = re.match(r"^([+-]?[0-9.]+)(.*)$", value)
    assert m is not None
    number, suffix = m.groups()
    try:
        if suffix in _SUFFIXES:
            return Decimal(number) * _SUFFIXES[suffix]
        return Decimal(value)  # decimal exponent, e.g. 1e3
    except InvalidOperation as exc:  # pragma: no cover - the pattern already matched
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc


def quantity_bytes(value: int | str) -> int:
    """A byte quantity as an integer, rounded up."""
    return int(parse_quantity(value).to_integral_value(rounding=ROUND_CEILING))


# Cron: five fields as Kubernetes CronJob accepts them (numbers, ranges, steps, lists, names,
# * and ?), or a macro. No backslashes, so the regex reads the same in CEL and in Python.
_CRON_ATOM = "([*?]|([0-9]{1,2}|[A-Za-z]{3})(-([0-9]{1,2}|[A-Za-z]{3}))?)([/][0-9]{1,2})?"
_CRON_FIELD = f"{_CRON_ATOM}(,{_CRON_ATOM})*"
CRON_PATTERN = (
    f"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|@every ([0-9]+(ms|s|m|h))+|{_CRON_FIELD}( +{_CRON_FIELD}){{4}})$"
)
_CRON_RE = re.compile(CRON_PATTERN)
CRON_RULE = Rule(
    rule=f"self.matches('{CRON_PATTERN}')",
    message=(
        "must be a cron schedule with 5 fields (minute hour day-of-month month day-of-week), "
        'e.g. "0 3 * * *", or a macro: @hourly, @daily, @weekly, @monthly, @yearly, @every 15m'
    ),
    check=lambda value: _CRON_RE.fullmatch(value) is not None,
)

#: A cron schedule (5 fields or a macro), validated by CEL with a readable message.
Cron = Annotated[str, Field(min_length=1, max_length=128), Cel(CRON_RULE)]

# --------------------------------------------------------------------------- shared enums

Strategy = Literal["real_time", "near_real_time", "batch", "hybrid", "recovery"]
STRATEGY_HELP = (
    "real_time applies every commit as soon as it arrives (lowest latency); "
    "near_real_time groups changes up to batchSize or maxBatchSeconds; "
    "batch applies large batches every maxBatchSeconds (highest throughput); "
    "hybrid applies small transactions at once and batches bulk ones; "
    "recovery catches up after an outage with the largest batches and no lag alerts."
)
ConsistencyLevel = Literal["strong", "eventual", "weak"]
CONSISTENCY_HELP = (
    "strong: a dual-write returns once the DuckDB copy has applied its commit (read-your-writes, bounded by "
    "dualWrite.strongTimeoutSeconds); eventual: it returns after the PostgreSQL commit and the copy follows "
    "through CDC; weak: it may be queued and applied in a later batch."
)

# --------------------------------------------------------------------------- shared objects


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: SubdomainName = Field(description="Name of the Secret, in the same namespace as the resource.")
    key: str = Field(
        default="dsn",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret whose value is used.",
    )


class PolicyRef(ApiModel):
    """Reference to a SyncPolicy in the same namespace."""

    name: ObjectName = Field(description="Name of the SyncPolicy, in the same namespace.")


class ResourceRequirements(ApiModel):
    """Compute resources of the worker containers (as in a Pod spec)."""

    requests: dict[str, Quantity] | None = Field(
        default=None,
        max_length=16,
        description="Minimum resources, e.g. {cpu: 500m, memory: 1Gi}.",
    )
    limits: dict[str, Quantity] | None = Field(
        default=None,
        max_length=16,
        description="Maximum resources, e.g. {memory: 4Gi}. Keep DuckDB's memoryLimit below the memory limit.",
    )


class ObjectMeta(ApiModel):
    """The parts of Kubernetes object metadata the operator reads (the apiserver owns the schema)."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(default=None, description="Name of the object, unique in its namespace.")
    namespace: str | None = Field(default=None, description="Namespace of the object.")
    uid: str | None = Field(default=None, description="Unique identifier set by the apiserver.")
    generation: int | None = Field(default=None, description="Generation of the desired state, bumped on spec changes.")
    resource_version: str | None = Field(default=None, description="Opaque version for optimistic concurrency.")
    labels: dict[str, str] | None = Field(default=None, description="Labels of the object.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations of the object.")


class Resource(ApiModel):
    """Fields common to every DataSync resource; subclasses add kind, spec and status."""

    api_version: Literal["datasync.dev/v1alpha1"] = Field(
        default="datasync.dev/v1alpha1",
        description="APIVersion defines the versioned schema of this representation of an object.",
    )
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")


# --------------------------------------------------------------------------- CRD facts


PrinterType = Literal["string", "integer", "number", "boolean", "date"]


@dataclass(frozen=True)
class PrinterColumn:
    """One ``additionalPrinterColumns`` entry (what ``kubectl get`` shows)."""

    name: str
    type: PrinterType
    json_path: str
    description: str
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


READY_COLUMN_PATH = '.status.conditions[?(@.type=="Ready")].status'
AGE_COLUMN = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since the resource was created.")


@dataclass(frozen=True)
class CrdInfo:
    """Everything the generator needs besides the model's schema."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    model: type[Resource]
    printer_columns: tuple[PrinterColumn, ...]

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"
