"""The worker wire protocol: names, subjects, headers and message bodies.

Everything a worker (in any language) and the operator must agree on lives here, and
docs/protocol.md describes the same contract. Every per-job name carries the MLJob UID, so a
re-created MLJob with the same name is a different job with different consumers and keys. Every
name a worker touches also carries its pipeline, so a NATS credential can be scoped to one
pipeline (see mljob.ops.permissions).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

#: The only protocol version this code speaks; a message with any other `version` is refused.
#: Version 2: one task stream per pipeline (a consumer per job), results and heartbeats on
#: subjects that carry the pipeline, so a worker credential can be limited to its pipeline.
PROTOCOL_VERSION = 2

#: The shared results stream, fed by every worker of every job.
RESULTS_STREAM = "MLJOB_RESULTS"
RESULTS_SUBJECT_PREFIX = "mljob.results"
RESULTS_CONSUMER = "collector"
#: Core NATS subject on which the collector says "job <uid> has nothing pending".
DRAINED_SUBJECT_PREFIX = "mljob.events.drained"
#: JetStream's advisory when a message reached its consumer's max_deliver (tokens: stream, consumer).
MAX_DELIVERIES_ADVISORY_SUBJECTS = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.*.*"
#: The operator's own stream keeping those advisories, so none is lost while it is down.
ADVISORY_STREAM = "MLJOB_ADVISORIES"
ADVISORY_CONSUMER = "operator"
#: Core NATS subject prefix on which workers say "I am still working on a task of job <uid>".
HEARTBEAT_SUBJECT_PREFIX = "mljob.heartbeat"
#: JetStream key-value bucket where active jobs are registered; workers watch it.
REGISTRY_BUCKET = "mljob-registry"
#: Header carrying the idempotency key that JetStream de-duplicates on.
MSG_ID_HEADER = "Nats-Msg-Id"
#: Results larger than this are replaced by a failed result that says so.
MAX_RESULT_BYTES = 256 * 1024


#: Prefix of the per-pipeline task streams; never a prefix of a shared stream's name.
TASK_STREAM_PREFIX = "MLJOB_TASKS_"
#: Prefix of the per-job durable consumers on a pipeline's task stream.
TASK_CONSUMER_PREFIX = "workers-"
TASK_SUBJECT_PREFIX = "mljob.tasks"


def task_stream(pipeline: str) -> str:
    """The pipeline's task stream, shared by its jobs (a pipeline is a DNS label, and stream
    names allow [A-Za-z0-9_-]): a work queue on one server, limits retention when replicated."""
    return f"{TASK_STREAM_PREFIX}{pipeline}"


def task_stream_subjects(pipeline: str) -> str:
    return f"{TASK_SUBJECT_PREFIX}.{pipeline}.*"


def task_subject(pipeline: str, uid: str) -> str:
    return f"{TASK_SUBJECT_PREFIX}.{pipeline}.{uid}"


#: Separates a job's uid from its consumer's generation in the consumer's name.
CONSUMER_GENERATION_MARK = "-r"


def task_consumer(uid: str, generation: int = 0) -> str:
    """The job's durable pull consumer on its pipeline's stream, filtered to its task subject.

    Generation N > 0 is the consumer's Nth replacement: one-replica consumers live on one NATS
    server, and one that stopped answering (its server lost) is replaced under a new name,
    since NATS still holds the old one's assignment. Workers learn the name from the registry
    entry, never from this function."""
    suffix = f"{CONSUMER_GENERATION_MARK}{generation}" if generation else ""
    return f"{TASK_CONSUMER_PREFIX}{uid}{suffix}"


def parse_task_consumer(name: str) -> tuple[str, int] | None:
    """(uid, generation) of a job consumer's name (`task_consumer`'s inverse), else None. The uid
    is not checked here (core.orphans.is_job_uid does that)."""
    if not name.startswith(TASK_CONSUMER_PREFIX):
        return None
    rest = name[len(TASK_CONSUMER_PREFIX) :]
    uid, mark, generation = rest.rpartition(CONSUMER_GENERATION_MARK)
    if mark and generation.isdigit() and generation == str(int(generation)) and int(generation) > 0:
        return uid, int(generation)
    return rest, 0


def results_subject(pipeline: str, uid: str) -> str:
    return f"{RESULTS_SUBJECT_PREFIX}.{pipeline}.{uid}"


def parse_results_subject(subject: str, prefix: str = RESULTS_SUBJECT_PREFIX) -> tuple[str, str] | None:
    """(pipeline, uid) of `<prefix>.<pipeline>.<uid>`; None for any other subject."""
    head, _, rest = subject.partition(f"{prefix}.")
    pipeline, _, uid = rest.partition(".")
    if head or not pipeline or not uid or "." in uid:
        return None
    return pipeline, uid


def drained_subject(uid: str) -> str:
    return f"{DRAINED_SUBJECT_PREFIX}.{uid}"


def heartbeat_subject(pipeline: str, uid: str) -> str:
    return f"{HEARTBEAT_SUBJECT_PREFIX}.{pipeline}.{uid}"


def registry_key(pipeline: str, uid: str) -> str:
    return f"{pipeline}.{uid}"


def task_msg_id(uid: str, item_id: str) -> str:
    return f"{uid}:{item_id}"


def result_msg_id(uid: str, item_id: str) -> str:
    return f"result:{uid}:{item_id}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobRef(BaseModel):
    """Which job a task belongs to."""

    model_config = ConfigDict(extra="ignore")
    uid: str
    namespace: str
    name: str
    pipeline: str


class Task(BaseModel):
    """One task message: the body published on the job's task subject."""

    model_config = ConfigDict(extra="ignore")
    version: int = PROTOCOL_VERSION
    job: JobRef
    item: dict[str, Any] = Field(description="The item: at least `id`, plus its free fields.")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _null_params_are_none(cls, value: object) -> object:
        """`"params": null` means no params, as an absent field does."""
        return {} if value is None else value

    @property
    def item_id(self) -> str:
        return str(self.item["id"])

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Result(BaseModel):
    """One result message, published by a worker to `mljob.results.<pipeline>.<uid>`."""

    model_config = ConfigDict(extra="ignore")
    version: int = PROTOCOL_VERSION
    job_uid: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    outcome: Outcome
    result: Any = None
    error: str | None = None
    attempts: int = Field(default=1, ge=1)
    worker: str | None = None
    finished_at: datetime = Field(default_factory=utcnow)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class RegistryEntry(BaseModel):
    """What a worker needs to pull a job's tasks; the value under `<pipeline>.<uid>`."""

    model_config = ConfigDict(extra="ignore")
    uid: str
    namespace: str
    name: str
    pipeline: str
    stream: str
    consumer: str
    subject: str
    created: datetime

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class MalformedMessage(ValueError):
    """A message that cannot be parsed; it goes to the dead-letter table, never crashes a loop."""


class UnsupportedVersion(MalformedMessage):
    """A message whose `version` is not PROTOCOL_VERSION: its shape cannot be trusted at all."""


def _shown(value: object) -> str:
    """A JSON value as quoted in an error: its JSON text, clipped; an object or array by kind."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_version(version: object) -> int:
    """The version rule: exactly the JSON integer PROTOCOL_VERSION. Checked on the raw JSON value,
    so `"2"`, `2.0` and `true` (a bool, which Python counts as an int) are refused like `3`."""
    if type(version) is int and version == PROTOCOL_VERSION:
        return version
    raise ValueError(f"unsupported protocol version {_shown(version)} (this side speaks {PROTOCOL_VERSION})")


class _WireTask(Task):
    """A task as read off the wire: `version` is required and is the JSON integer we speak.

    The models above default `version` for the code that builds messages; decoding must not,
    or a message of another protocol version would be read as ours.
    """

    version: int

    _version = field_validator("version", mode="before")(_check_version)


class _WireResult(Result):
    """A result as read off the wire; see :class:`_WireTask`. `attempts` is a JSON integer too."""

    version: int
    attempts: StrictInt = Field(default=1, ge=1)

    _version = field_validator("version", mode="before")(_check_version)


def _invalid(kind: str, err: ValidationError) -> MalformedMessage:
    """The error to raise for a body that failed validation; a bad `version` wins over the rest,
    because a message of another version is expected to fail the other checks too."""
    errors = err.errors()
    for error in errors:
        if error["loc"] == ("version",) and error["type"] == "value_error":
            return UnsupportedVersion(str(error["ctx"]["error"]))
    first = errors[0]
    return MalformedMessage(f"invalid {kind}: {first['msg']} at {first['loc']}")


def decode_task(data: bytes) -> Task:
    """Parse a task body; raises UnsupportedVersion or MalformedMessage."""
    try:
        task = _WireTask.model_validate_json(data)
    except ValidationError as err:
        raise _invalid("task", err) from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedMessage(f"invalid task: {err}") from err
    if "id" not in task.item:
        raise MalformedMessage("invalid task: item has no id")
    item_id = task.item["id"]
    if not isinstance(item_id, str) or not item_id:
        # A string only: numbers such as 1.5 or 1e3 have no text every language agrees on, and
        # the operator writes every id as a string (see docs/protocol.md, Task messages).
        raise MalformedMessage(f"invalid task: item.id must be a non-empty string, got {_shown(item_id)}")
    # Validated already: hand out the plain model (equality and copies compare the class).
    return Task.model_construct(task.model_fields_set, **dict(task))


def decode_result(data: bytes) -> Result:
    """Parse a result body; raises UnsupportedVersion or MalformedMessage."""
    try:
        result = _WireResult.model_validate_json(data)
    except ValidationError as err:
        raise _invalid("result", err) from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedMessage(f"invalid result: {err}") from err
    return Result.model_construct(result.model_fields_set, **dict(result))
