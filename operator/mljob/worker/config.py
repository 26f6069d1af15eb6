"""Worker settings."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

NATS_URL_ENV = "MLJOB_NATS_URL"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def default_nats_url() -> str:
    return os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL


def default_worker_id() -> str:
    """Host name (the pod name in Kubernetes) and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    pipeline: str
    nats_url: str = field(default_factory=default_nats_url)
    #: Handlers running at once (and so tasks held at once) by this worker.
    concurrency: int = 8
    #: Most tasks fetched from one job in one turn of the round-robin.
    batch: int = 16
    #: On stop, how long in-flight handlers may run on before their tasks are NAKed.
    grace_seconds: float = 20.0
    worker_id: str = field(default_factory=default_worker_id)
    #: Result publish: tries, and the first back-off delay (doubled after each failure).
    publish_attempts: int = 5
    publish_backoff_seconds: float = 0.2
    publish_timeout_seconds: float = 5.0
    ack_timeout_seconds: float = 5.0
    #: Idle polling: every active job is asked for tasks at least this often when none come.
    idle_poll_max_seconds: float = 0.5
    #: Heartbeat fallback when the consumer's ack_wait cannot be read.
    default_ack_wait_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.pipeline or "." in self.pipeline or "*" in self.pipeline or ">" in self.pipeline:
            raise ValueError(f"invalid pipeline name {self.pipeline!r}: one NATS subject token expected")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must not be negative")
        if self.publish_attempts < 1:
            raise ValueError("publish_attempts must be at least 1")
