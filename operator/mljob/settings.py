"""Operator settings from environment variables (flags override them in the CLI)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass
class OperatorSettings:
    nats_url: str = field(default_factory=lambda: _env("MLJOB_NATS_URL", "nats://127.0.0.1:4222"))
    redis_url: str = field(default_factory=lambda: _env("MLJOB_REDIS_URL", "redis://127.0.0.1:6379/0"))
    postgres_dsn: str = field(
        default_factory=lambda: _env("MLJOB_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/mljob")
    )
    #: Postgres schema for all tables (lets several installations or tests share one database).
    postgres_schema: str | None = field(
        default_factory=lambda: os.environ.get("MLJOB_POSTGRES_SCHEMA") or None
    )
    redis_prefix: str = field(default_factory=lambda: _env("MLJOB_REDIS_PREFIX", "mljob"))
    reconcile_interval: float = field(default_factory=lambda: float(_env("MLJOB_RECONCILE_INTERVAL", "5")))
    dispatch_chunk: int = field(default_factory=lambda: int(_env("MLJOB_DISPATCH_CHUNK", "1000")))
    stream_replicas: int = field(default_factory=lambda: int(_env("MLJOB_STREAM_REPLICAS", "1")))
    max_ack_pending: int = field(default_factory=lambda: int(_env("MLJOB_MAX_ACK_PENDING", "1000")))
    run_collector: bool = field(default_factory=lambda: _env("MLJOB_RUN_COLLECTOR", "true") == "true")
    namespaces: list[str] = field(
        default_factory=lambda: [n for n in _env("MLJOB_NAMESPACES", "").split(",") if n]
    )
    peering: bool = field(default_factory=lambda: _env("MLJOB_PEERING", "false") == "true")
    actor: str = field(default_factory=lambda: _env("HOSTNAME", "mljob-operator"))
    #: How often a running job's lost stream is recreated and re-dispatched before it fails.
    max_stream_recreations: int = field(
        default_factory=lambda: int(_env("MLJOB_MAX_STREAM_RECREATIONS", "3"))
    )
    #: Streams, registry entries and Redis keys of no live MLJob are removed once this old.
    orphan_grace_seconds: float = field(
        default_factory=lambda: float(_env("MLJOB_ORPHAN_GRACE_SECONDS", "300"))
    )
    #: Seconds between orphan sweeps (the first one runs one interval after start-up).
    orphan_sweep_interval: float = field(
        default_factory=lambda: float(_env("MLJOB_ORPHAN_SWEEP_INTERVAL", "60"))
    )
