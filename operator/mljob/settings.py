"""Every MLJOB_* setting of the operator, the collector, the API, the worker and the client, in one place.

Each field names its environment variable, type, default and meaning; the README's table is
rendered from these classes (`python -m mljob.settings`) and a test keeps the two equal. Command
line flags are passed to `load` and override the environment. This module imports only pydantic,
pydantic-settings and the standard library, so a worker-only install can use it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PREFIX = "MLJOB_"
S = TypeVar("S", bound=BaseSettings)


def _var(
    name: str, default: Any = ..., doc: str = "", shown: str | None = None, flag: str | None = None, **kw: Any
) -> Any:
    """A field read from MLJOB_<name>; `shown`: the README's text for a computed default; `flag`:
    the command-line flag when it is not --field-name."""
    extra: JsonDict = {"shown": shown} if shown is not None else {}
    if flag is not None:
        extra["flag"] = flag
    return Field(default, validation_alias=PREFIX + name, description=doc, json_schema_extra=extra, **kw)


def default_worker_id() -> str:
    """Host name (the pod name in Kubernetes) and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


#: Where Kubernetes mounts a pod's namespace (with its service account token).
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pod_namespace() -> str:
    """The namespace this pod runs in (its service account's), else `default` (out of a cluster)."""
    try:
        with open(NAMESPACE_FILE, encoding="utf-8") as file:
            return file.read().strip() or "default"
    except OSError:
        return "default"


class SettingsError(ValueError):
    """A setting refused at start-up; the message names the variable (or flag) and the value."""


class NatsSettings(BaseSettings):
    """What every process needs: where NATS is and how to authenticate to it."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, populate_by_name=True, extra="ignore", env_ignore_empty=False
    )

    nats_url: str = _var(
        "NATS_URL",
        "nats://127.0.0.1:4222",
        "NATS with JetStream (`nats://` or `tls://`), comma-separated for a cluster",
    )
    nats_creds_file: str | None = _var(
        "NATS_CREDS_FILE", None, "NATS user credentials file (JWT and NKey seed)", shown="(none)"
    )
    nats_user: str | None = _var(
        "NATS_USER", None, "NATS user name (with `MLJOB_NATS_PASSWORD`)", shown="(none)"
    )
    nats_password: SecretStr | None = _var("NATS_PASSWORD", None, "NATS password", shown="(none)")
    nats_tls_ca_file: str | None = _var(
        "NATS_TLS_CA_FILE", None, "CA bundle that signed the NATS server certificate", shown="(system CAs)"
    )
    log_level: str = _var("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR (`--log-level`)")
    log_format: str = _var(
        "LOG_FORMAT", "text", "`text`, or `json`: one object per line, with the job's namespace, name and uid"
    )

    @field_validator("nats_creds_file", "nats_user", "nats_password", "nats_tls_ca_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        fmt = value.lower()
        if fmt not in {"text", "json"}:
            raise ValueError("input should be text or json")
        return fmt

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("input should be DEBUG, INFO, WARNING or ERROR")
        return level


class StoreSettings(NatsSettings):
    """Where the stores are: what every process that reads Redis and Postgres needs besides NATS
    (the collector, the operator, the read-only API)."""

    redis_url: str = _var("REDIS_URL", "redis://127.0.0.1:6379/0", "per-item state")
    redis_cluster: bool = _var(
        "REDIS_CLUSTER",
        False,
        "`MLJOB_REDIS_URL` names one node of a Redis Cluster: the client finds the others (a job's "
        "keys share one slot)",
    )
    postgres_dsn: str = _var(
        "POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/mljob", "job rows, results, audit"
    )
    postgres_schema: str | None = _var(
        "POSTGRES_SCHEMA",
        None,
        "schema for the tables (migrations run there)",
        shown="search_path default",
    )
    redis_prefix: str = _var("REDIS_PREFIX", "mljob", "key prefix (`<prefix>:{<uid>}:pending` …)")
    redis_max_connections: int = _var(
        "REDIS_MAX_CONNECTIONS",
        32,
        "Redis connections per process; a call waits for a free one rather than failing",
        ge=1,
    )

    @field_validator("postgres_schema", mode="before")
    @classmethod
    def _schema_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class CollectorSettings(StoreSettings):
    """The collector's knobs (the operator shares them: it runs the collector in-process)."""

    stream_replicas: int = _var(
        "STREAM_REPLICAS", 1, "JetStream replicas of streams and the registry (results stream too)", ge=1
    )
    collector_batch: int = _var(
        "COLLECTOR_BATCH", 256, "results per fetch of the collector (`--batch`)", flag="--batch", ge=1
    )
    collector_loops: int = _var(
        "COLLECTOR_LOOPS",
        2,
        "batches the collector stores at once, each fetched on its own (`--loops`): one waits "
        "for Postgres while another is fetched",
        flag="--loops",
        ge=1,
        le=16,
    )
    metrics_port: int = _var(
        "METRICS_PORT",
        9090,
        "port of `/metrics` (Prometheus) and `/readyz` (`0`: neither is served)",
        ge=0,
        le=65535,
    )


class OperatorSettings(CollectorSettings):
    """The operator's own knobs (it also reads the collector's and NATS settings)."""

    reconcile_interval: float = _var(
        "RECONCILE_INTERVAL", 5.0, "seconds between reconcile ticks of a job", gt=0
    )
    idle_reconcile_interval: float = _var(
        "IDLE_RECONCILE_INTERVAL",
        60.0,
        "longest sleep of a quiet job's loop: from `MLJOB_RECONCILE_INTERVAL` it doubles each tick "
        "nothing moves (results wake the loop at once)",
        gt=0,
    )
    reconcile_workers: int = _var(
        "RECONCILE_WORKERS",
        32,
        "MLJobs reconciled at once by the operator's one scheduler (a job is never reconciled "
        "twice at once; the others wait in due order)",
        ge=1,
    )
    max_concurrent_dispatches: int = _var(
        "MAX_CONCURRENT_DISPATCHES",
        16,
        "jobs dispatching at once; the others wait their turn (with thousands of MLJobs created "
        "together, all at once only queue on the stores)",
        ge=1,
    )
    kube_threads: int = _var(
        "KUBE_THREADS", 16, "Kubernetes API calls in flight at once (threads of the blocking client)", ge=1
    )
    dispatch_chunk: int = _var(
        "DISPATCH_CHUNK", 1000, "tasks per published chunk (the cursor moves per chunk)", ge=1
    )
    dispatch_window: int = _var(
        "DISPATCH_WINDOW",
        2048,
        "tasks published and not yet confirmed by the stream, at most, per dispatching job "
        "(below nats-py's own limit of 4,000)",
        ge=1,
        le=4000,
    )
    dispatch_publish_timeout_seconds: float = _var(
        "DISPATCH_PUBLISH_TIMEOUT_SECONDS",
        10.0,
        "longest wait for the stream to confirm a published task (a full window of outstanding "
        "acks, or the last one); past it the dispatch step ends and resumes at its cursor",
        gt=0,
    )
    max_ack_pending: int = _var("MAX_ACK_PENDING", 1000, "tasks out with workers at once, per job", ge=1)
    consumer_replicas: int | None = _var(
        "CONSUMER_REPLICAS",
        None,
        "JetStream replicas of each job's consumer: by default one on a replicated task stream "
        "(limits retention), the stream's own on a one-replica (work-queue) stream, which takes no other",
        shown="1 or the stream's",
        ge=1,
    )
    consumer_replace_seconds: float = _var(
        "CONSUMER_REPLACE_SECONDS",
        120.0,
        "a job's consumer that has not answered this long while its stream does (a one-replica "
        "consumer whose NATS server is lost) is replaced under a new name",
        gt=0,
    )
    run_collector: bool = _var(
        "RUN_COLLECTOR",
        True,
        "run the results collector in-process (`--no-collector` to use `mljob collector`)",
    )
    namespaces: Annotated[list[str], NoDecode] = _var(
        "NAMESPACES",
        [],
        "comma-separated namespaces to watch (`--namespace`, repeatable)",
        shown="(all)",
    )
    leader_election: bool = Field(
        False,
        validation_alias=AliasChoices("MLJOB_LEADER_ELECTION", "MLJOB_PEERING"),
        description="HA replicas: only the holder of a coordination.k8s.io Lease reconciles, "
        "all watch (`--leader-elect`; `--peering` and `MLJOB_PEERING` are deprecated aliases)",
        json_schema_extra={"flag": "--leader-elect"},
    )
    lease_name: str = _var("LEASE_NAME", "mljob-operator", "the leader Lease (`--lease-name`)")
    lease_namespace: str = Field(
        default_factory=lambda: pod_namespace(),
        validation_alias=AliasChoices("MLJOB_LEASE_NAMESPACE", "MLJOB_POD_NAMESPACE"),
        description="namespace of the leader Lease (`--lease-namespace`)",
        json_schema_extra={
            "shown": "`$MLJOB_POD_NAMESPACE`, else the pod's namespace (service account), else `default`"
        },
    )
    lease_duration_seconds: int = _var(
        "LEASE_DURATION_SECONDS",
        15,
        "how long a standby waits, after the leader's last renewal it saw, before taking over "
        "(the failover time of a crashed leader)",
        ge=1,
    )
    renew_deadline_seconds: float = _var(
        "RENEW_DEADLINE_SECONDS",
        10.0,
        "a leader that could not renew its Lease for this long stops reconciling "
        "(shorter than `MLJOB_LEASE_DURATION_SECONDS`)",
        gt=0,
    )
    retry_period_seconds: float = _var(
        "RETRY_PERIOD_SECONDS",
        2.0,
        "how often the leader renews and a standby tries to acquire "
        "(shorter than `MLJOB_RENEW_DEADLINE_SECONDS`)",
        gt=0,
    )
    liveness_endpoint: str | None = _var(
        "LIVENESS_ENDPOINT",
        None,
        "kopf's liveness endpoint, e.g. `http://0.0.0.0:8080/healthz` (`--liveness`)",
        shown="(none)",
        flag="--liveness",
    )
    actor: str = Field(
        "mljob-operator",
        validation_alias=AliasChoices("MLJOB_ACTOR", "HOSTNAME"),
        description="who wrote a status or audit row (`HOSTNAME` if unset: the pod name)",
        json_schema_extra={"shown": "`$HOSTNAME`, else `mljob-operator`"},
    )
    max_stream_recreations: int = _var(
        "MAX_STREAM_RECREATIONS",
        3,
        "how often a job's lost stream is recreated and re-dispatched before the job fails with `StreamLost`",
        ge=0,
    )
    orphan_sweep_interval: float = _var(
        "ORPHAN_SWEEP_INTERVAL", 60.0, "seconds between orphan sweeps (`0` disables them)", ge=0
    )
    orphan_grace_seconds: float = _var(
        "ORPHAN_GRACE_SECONDS",
        300.0,
        "streams, registry entries and Redis keys of no live MLJob are removed once this old",
        ge=0,
    )

    @field_validator("liveness_endpoint", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("renew_deadline_seconds")
    @classmethod
    def _renew_before_expiry(cls, value: float, info: ValidationInfo) -> float:
        duration = info.data.get("lease_duration_seconds")
        if duration is not None and not value < duration:
            raise ValueError(
                f"must be shorter than MLJOB_LEASE_DURATION_SECONDS ({duration}), got {value:g}: a "
                "leader must stop before a standby may take over"
            )
        return value

    @field_validator("retry_period_seconds")
    @classmethod
    def _retry_before_deadline(cls, value: float, info: ValidationInfo) -> float:
        deadline = info.data.get("renew_deadline_seconds")
        if deadline is not None and not value < deadline:
            raise ValueError(
                f"must be shorter than MLJOB_RENEW_DEADLINE_SECONDS ({deadline:g}), got {value:g}: a "
                "leader must get more than one try to renew"
            )
        return value

    @field_validator("namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


class ApiSettings(StoreSettings):
    """The read-only HTTP API (`mljob api`): where it listens, how long it trusts a review."""

    api_host: str = _var("API_HOST", "0.0.0.0", "address the API listens on (`--host`)", flag="--host")
    api_port: int = _var("API_PORT", 8080, "port of the API (`--port`)", flag="--port", ge=1, le=65535)
    api_review_cache_seconds: float = _var(
        "API_REVIEW_CACHE_SECONDS",
        10.0,
        "how long the apiserver's answer about a token (TokenReview) or a right (SubjectAccessReview) "
        "is reused, keyed by a hash of the token (`0`: ask every request)",
        ge=0,
    )


#: The chart's Service of the read-only API, for the release `mljob-operator` in `mljob`.
DEFAULT_API_SERVICE = "mljob/mljob-operator-api:http"


class ClientSettings(BaseSettings):
    """`mljob status|items|retry|results|watch|cancel`, `kubectl mljob` and `mljob.client`: where
    the read-only API is and which token to send it. Kubernetes itself is reached as kubectl
    does (`--kubeconfig`, `KUBECONFIG`, the context's namespace)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, populate_by_name=True, extra="ignore", env_ignore_empty=False
    )

    api_url: str | None = _var(
        "API_URL",
        None,
        "the read-only API's base URL, e.g. `http://localhost:8080` after a port-forward "
        "(`--api-url`); unset: through the apiserver's service proxy to `MLJOB_API_SERVICE`",
        shown="(none)",
    )
    api_service: str = _var(
        "API_SERVICE",
        DEFAULT_API_SERVICE,
        "the API's Service as `NAMESPACE/NAME[:PORT]`, reached through the apiserver's service "
        "proxy with the kubeconfig's credentials (`--api-service`)",
    )
    api_token: SecretStr | None = _var(
        "API_TOKEN",
        None,
        "the bearer token sent to the API (`--token`), e.g. a `kubectl create token`; unset: the "
        "kubeconfig user's token",
        shown="the kubeconfig's",
        flag="--token",
    )

    @field_validator("api_url", "api_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("input should be an http:// or https:// URL")
        return value.rstrip("/") if value is not None else None

    @field_validator("api_service")
    @classmethod
    def _service_ref(cls, value: str) -> str:
        namespace, slash, rest = value.partition("/")
        name = rest.partition(":")[0]
        if not slash or not namespace or not name:
            raise ValueError("input should be NAMESPACE/NAME or NAMESPACE/NAME:PORT")
        return value


class WorkerSettings(NatsSettings):
    """A worker process (`mljob worker`, or `WorkerConfig(pipeline=...)` in Python)."""

    model_config = SettingsConfigDict(frozen=True)

    pipeline: str = _var("PIPELINE", doc="pipeline whose jobs to serve (`--pipeline`)", shown="(required)")
    concurrency: int = _var(
        "WORKER_CONCURRENCY",
        8,
        "handler calls at once: tasks held at once, or with a batch handler batches (`--concurrency`)",
        ge=1,
    )
    batch: int = _var("WORKER_BATCH", 16, "most tasks fetched from one job in one turn (`--batch`)", ge=1)
    batch_size: int | None = _var(
        "WORKER_BATCH_SIZE",
        None,
        "batch handlers: most tasks per handler call (`--batch-size`)",
        shown="the handler's `max_size`, else `16`",
        ge=1,
    )
    batch_wait_seconds: float | None = _var(
        "WORKER_BATCH_WAIT_SECONDS",
        None,
        "batch handlers: longest wait for a batch to fill before it runs (`--batch-wait-seconds`)",
        shown="the handler's `max_wait`, else `0.05`",
        ge=0,
    )
    grace_seconds: float = _var(
        "WORKER_GRACE_SECONDS",
        20.0,
        "on stop, how long in-flight handlers may run before their tasks are NAKed (`--grace-seconds`)",
        ge=0,
    )
    worker_id: str = _var(
        "WORKER_ID",
        doc="name in results and logs (`--worker-id`)",
        shown="`<host>-<pid>`",
        default_factory=default_worker_id,
    )
    publish_attempts: int = _var(
        "WORKER_PUBLISH_ATTEMPTS",
        5,
        "tries to publish a result, at the least, before its task is NAKed",
        ge=1,
    )
    publish_backoff_seconds: float = _var(
        "WORKER_PUBLISH_BACKOFF_SECONDS",
        0.2,
        "first delay between publish tries (doubled each time, at most 2 s)",
        ge=0,
    )
    publish_patience_seconds: float = _var(
        "WORKER_PUBLISH_PATIENCE_SECONDS",
        60.0,
        "how long a result's publish is retried, at the least, before its task is NAKed: longer than "
        "a JetStream leader election or a node's restart, so an outage costs no delivery",
        ge=0,
    )
    publish_timeout_seconds: float = _var(
        "WORKER_PUBLISH_TIMEOUT_SECONDS",
        5.0,
        "how long the stream may take to confirm a group of results (one publish try)",
        gt=0,
    )
    ack_timeout_seconds: float = _var(
        "WORKER_ACK_TIMEOUT_SECONDS", 5.0, "how long the flush after a group of acks may take", gt=0
    )
    idle_poll_max_seconds: float = _var(
        "WORKER_IDLE_POLL_MAX_SECONDS", 0.5, "every active job is asked for tasks at least this often", gt=0
    )
    default_ack_wait_seconds: float = _var(
        "WORKER_DEFAULT_ACK_WAIT_SECONDS",
        10.0,
        "heartbeat basis when the consumer's ack_wait is unknown",
        gt=0,
    )

    @field_validator("pipeline")
    @classmethod
    def _one_subject_token(cls, value: str) -> str:
        if not value or any(c in value for c in ".*> "):
            raise ValueError(f"invalid pipeline name {value!r}: one NATS subject token expected")
        return value


ROLES: dict[str, type[BaseSettings]] = {
    "operator": OperatorSettings,
    "collector": CollectorSettings,
    "api": ApiSettings,
    "worker": WorkerSettings,
    "client": ClientSettings,
}


def env_name(info: FieldInfo) -> str:
    """The (first) environment variable of a field."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias)


def load(cls: type[S], **flags: Any) -> S:
    """Settings from the environment, overridden by the flags given (None = not given).

    A refused value raises SettingsError naming the flag (when it came from one) or the variable.
    """
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as err:
        raise SettingsError(describe(cls, err, set(given))) from None


def describe(cls: type[BaseSettings], err: ValidationError, flags: set[str]) -> str:
    """One line per refused setting: `MLJOB_X: input should be ..., got 'value'`."""
    by_name = {
        **{env_name(info): name for name, info in cls.model_fields.items()},
        **{n: n for n in cls.model_fields},
    }
    lines = []
    for problem in err.errors():
        loc = next((str(part) for part in problem["loc"] if isinstance(part, str)), "")
        field = by_name.get(loc, loc)
        info = cls.model_fields.get(field)
        flag = flag_name(field, info)
        where = flag if field in flags or info is None else env_name(info)
        message = str(problem["msg"]).split(", unable to ", 1)[0].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        if problem["type"] == "missing":
            lines.append(f"{where}: required, not set (or pass {flag})")
        elif problem["type"] == "value_error" or "password" in field:
            lines.append(f"{where}: {message}")
        else:
            lines.append(f"{where}: {message}, got {problem['input']!r}")
    return "; ".join(lines)


def flag_name(field: str, info: FieldInfo | None) -> str:
    """The command-line flag of a field (`--batch` for collector_batch, else --field-name)."""
    extra = info.json_schema_extra if info is not None else None
    if isinstance(extra, dict) and "flag" in extra:
        return str(extra["flag"])
    return "--" + field.replace("_", "-")


def shown_default(info: FieldInfo) -> str:
    """How the README states a field's default."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "shown" in extra:
        return str(extra["shown"])
    value = info.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def rows() -> Iterator[tuple[str, str, str, str]]:
    """(variable, default, used by, meaning) for every setting: shared ones first, then by role."""
    seen: set[str] = set()
    for cls in (
        NatsSettings,
        StoreSettings,
        CollectorSettings,
        OperatorSettings,
        ApiSettings,
        WorkerSettings,
        ClientSettings,
    ):
        for field, info in cls.model_fields.items():
            name = env_name(info)
            if name in seen:
                continue
            seen.add(name)
            roles = ", ".join(role for role, each in ROLES.items() if field in each.model_fields)
            yield f"`{name}`", shown_default(info), roles, info.description or ""


def markdown_table() -> str:
    """The README's settings table."""
    lines = ["| variable | default | used by | meaning |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
