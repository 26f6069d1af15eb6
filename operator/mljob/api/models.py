"""MLJob spec and status models.

These models are the single source of truth: `mljob crd` renders the CustomResourceDefinition
from them (OpenAPI schema plus the CEL rules attached here), and the operator parses objects
with them. A rule that the API server enforces is written once, next to its field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "mljob.dev"
VERSION = "v1alpha1"
KIND = "MLJob"
PLURAL = "mljobs"
SINGULAR = "mljob"
SHORT_NAMES = ["mlj"]

PIPELINE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_INLINE_ITEMS = 10_000
MAX_ITEM_ID_LENGTH = 512
#: The longest `stallTimeoutSeconds` a job may have: no activity signal is used for longer.
MAX_STALL_TIMEOUT_SECONDS = 604_800
MAX_DIAGNOSTICS = 20
MAX_CONDITIONS = 16


class Phase(StrEnum):
    PENDING = "Pending"
    DISPATCHING = "Dispatching"
    RUNNING = "Running"
    CANCELING = "Canceling"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ItemObject(BaseModel):
    """An inline item given as an object: an `id` plus free fields (url, metadata...)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=MAX_ITEM_ID_LENGTH)


# An item is a plain id string or an object with an id. Structural schemas cannot say
# "string or object", so the CRD keeps items schemaless and checks their shape with CEL.
ITEMS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_INLINE_ITEMS,
    "description": "Inline items: plain id strings, or objects with an `id` and free fields.",
    # minLength applies to string items, required to object items: together they say
    # "a non-empty id string, or an object with an id" without a type the schema cannot state.
    "items": {
        "x-kubernetes-preserve-unknown-fields": True,
        "minLength": 1,
        "maxLength": MAX_ITEM_ID_LENGTH,
        "required": ["id"],
    },
}


class ItemsFrom(_Model):
    """Where to read items when they are too many to inline."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.configMaps) != has(self.url)",
                    "message": "spec.itemsFrom: set exactly one of configMaps (ConfigMap names) "
                    "and url (an http(s) manifest)",
                },
                {
                    "rule": "!has(self.sha256) || has(self.url)",
                    "message": "spec.itemsFrom.sha256 checks a url manifest: set itemsFrom.url too, "
                    "or remove sha256",
                },
            ]
        }
    )

    config_maps: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Names of ConfigMaps in the job's namespace; each data value holds ids, "
        "one per line, or JSON lines with an `id` field.",
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": 253}},
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="An http(s) manifest: one id per line or JSON lines.",
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[a-f0-9]{64}$",
        max_length=64,
        description="Expected SHA-256 (lowercase hex) of the manifest at url.",
    )


#: Optional spec fields that may not be added or removed after creation.
OPTIONAL_IMMUTABLE_FIELDS = ("itemsFrom", "activeDeadlineSeconds")
EXACTLY_ONE_SOURCE_MESSAGE = (
    "spec: set exactly one of spec.items (an inline list) and spec.itemsFrom (ConfigMaps or a URL)"
)
IMMUTABLE_MESSAGE = (
    "spec is immutable except spec.cancel and spec.ttlSecondsAfterFinished: "
    "create a new MLJob to change the pipeline, items or settings"
)


def _immutable(field: str) -> dict[str, Any]:
    """A transition rule that keeps one field as it was created."""
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"spec.{field}: " + IMMUTABLE_MESSAGE}
        ]
    }


def _presence_rule() -> str:
    return " && ".join(f"has(self.{name}) == has(oldSelf.{name})" for name in OPTIONAL_IMMUTABLE_FIELDS)


class MLJobSpec(_Model):
    """What to run: a pipeline and its items, with the knobs of the job's lifecycle."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": _presence_rule(), "message": IMMUTABLE_MESSAGE},
                {
                    "rule": "!(oldSelf.?cancel.orValue(false)) || self.?cancel.orValue(false)",
                    "message": "spec.cancel cannot go back from true to false: a cancelled job stays "
                    "cancelled",
                },
            ]
        }
    )

    pipeline: str = Field(
        min_length=1,
        max_length=63,
        pattern=PIPELINE_PATTERN,
        description="The pipeline whose workers process the items (lowercase letters, digits "
        "and '-', like a DNS label).",
        json_schema_extra=_immutable("pipeline"),
    )
    items: list[str | ItemObject] | None = Field(
        default=None,
        max_length=MAX_INLINE_ITEMS,
        description=ITEMS_SCHEMA["description"],
        json_schema_extra={"x-mljob-schema": ITEMS_SCHEMA},
    )
    items_from: ItemsFrom | None = Field(
        default=None,
        description="Read items from ConfigMaps or a URL.",
        json_schema_extra=_immutable("itemsFrom"),
    )
    params: dict[str, Any] | None = Field(
        default=None, description="Free-form parameters passed unchanged to every task."
    )
    failure_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="The job is Failed when failed/total exceeds this fraction.",
        json_schema_extra=_immutable("failureThreshold"),
    )
    max_deliver: int = Field(
        default=2,
        ge=1,
        le=100,
        description="How many times a task may be delivered to workers.",
        json_schema_extra=_immutable("maxDeliver"),
    )
    ack_wait_seconds: int = Field(
        default=60,
        ge=5,
        le=86_400,
        description="How long a worker may hold a task without acking or heartbeating.",
        json_schema_extra=_immutable("ackWaitSeconds"),
    )
    stall_timeout_seconds: int = Field(
        default=600,
        ge=10,
        le=MAX_STALL_TIMEOUT_SECONDS,
        description="With no activity for this long, the job's outstanding work is reconciled.",
        json_schema_extra=_immutable("stallTimeoutSeconds"),
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="Wall-clock limit from the start of the job.",
        json_schema_extra=_immutable("activeDeadlineSeconds"),
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=31_536_000,
        description="Delete the MLJob this long after it finished.",
    )
    cancel: bool = Field(default=False, description="Set to true to cancel the job (cannot be undone).")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> MLJobSpec:
        if (self.items is None) == (self.items_from is None):
            raise ValueError(EXACTLY_ONE_SOURCE_MESSAGE)
        return self


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """A Kubernetes-style condition: type, status, a CamelCase reason and a human message."""

    type: str = Field(min_length=1, max_length=64)
    status: ConditionStatus
    reason: str = Field(default="", max_length=128)
    message: str = Field(default="", max_length=4096)
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class Diagnostic(_Model):
    """One notable event in the job's life, kept in a short bounded list for `kubectl describe`."""

    time: str = Field(json_schema_extra={"format": "date-time"})
    reason: str = Field(max_length=128)
    message: str = Field(max_length=4096)


class MLJobStatus(_Model):
    """What the operator observed. CEL rules guard it on the server (the phase rule: core.phases)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(oldSelf.processed) || (has(self.processed) && "
                    "self.processed >= oldSelf.processed)",
                    "message": "status.processed never decreases",
                },
                {
                    "rule": "!has(oldSelf.failed) || (has(self.failed) && self.failed >= oldSelf.failed)",
                    "message": "status.failed never decreases",
                },
                {
                    "rule": "!has(oldSelf.completionTime) || (has(self.completionTime) && "
                    "self.completionTime == oldSelf.completionTime)",
                    "message": "status.completionTime never changes once set",
                },
            ]
        }
    )

    phase: Phase | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=MAX_CONDITIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
    total: int | None = Field(default=None, ge=0)
    dispatched: int | None = Field(default=None, ge=0)
    processed: int | None = Field(default=None, ge=0)
    failed: int | None = Field(default=None, ge=0)
    pending: int | None = Field(default=None, ge=0)
    progress: str | None = Field(
        default=None,
        pattern=r"^[0-9]{1,3}%$",
        max_length=4,
        description="Processed share of the total, as shown by kubectl, e.g. 87%.",
    )
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    last_activity_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    dispatch_cursor: int | None = Field(
        default=None,
        ge=0,
        description="Items published so far, in item order; a restarted operator resumes here.",
    )
    stream_recreations: int | None = Field(
        default=None,
        ge=0,
        description="How often the job's lost stream was recreated and its pending items re-dispatched.",
    )
    consumer_generation: int | None = Field(
        default=None,
        ge=0,
        description="How often the job's consumer was replaced because its NATS server stopped answering "
        "(its name ends in -r<N>).",
    )
    diagnostics: list[Diagnostic] = Field(default_factory=list, max_length=MAX_DIAGNOSTICS)
