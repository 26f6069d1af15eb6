"""Least-privilege NATS permissions of the operator, the collector, the workers and the read-only
API, as data.

Why: a worker runs user code next to a NATS credential. If that credential could delete or purge
streams, publish tasks, rewrite the registry or ack the collector's results, one buggy or
hostile handler could lose or forge every job's work. nats-server enforces these lists per user
(publish allow/deny, subscribe allow; a deny wins over an allow). The local stack renders them
into its config (mljob_dev.devstack.nats_config); `python -m mljob.ops.permissions --role worker
[--pipeline P]` prints the block for a NATS you run yourself.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass

from mljob import protocol

API = "$JS.API"
ACK = "$JS.ACK"
INBOX = "_INBOX.>"  # replies to requests (JS API responses, PubAcks) and pulled messages
REGISTRY_STREAM = f"KV_{protocol.REGISTRY_BUCKET}"
_PIPELINE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Permissions:
    """What one identity may publish (allow minus deny) and subscribe to."""

    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...]
    subscribe_allow: tuple[str, ...]


def operator() -> Permissions:
    """JetStream admin of its account, plus the collector's rights (it can run it in-process).

    Publishing max-deliveries advisories is for `mljob chaos exhaust`, which announces a fake
    exhaustion with this (the dev tools') identity; the server publishes the real ones itself.
    """
    collector_rights = collector()
    return Permissions(
        publish_allow=(
            f"{API}.>",
            f"{protocol.TASK_SUBJECT_PREFIX}.>",
            f"$KV.{protocol.REGISTRY_BUCKET}.>",
            f"{ACK}.{protocol.ADVISORY_STREAM}.{protocol.ADVISORY_CONSUMER}.>",
            protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS.replace("*.*", ">"),
            *(s for s in collector_rights.publish_allow if not s.startswith(f"{API}.")),
        ),
        publish_deny=(),
        subscribe_allow=(
            INBOX,
            f"{protocol.HEARTBEAT_SUBJECT_PREFIX}.>",
            f"{protocol.DRAINED_SUBJECT_PREFIX}.>",
        ),
    )


def collector() -> Permissions:
    """The results stream and its one durable consumer, and the drained events; nothing else.

    Both create subjects name the one consumer: nats-py sends the legacy DURABLE form for a
    `durable_name`, and the named form when a config sets `name`.
    """
    stream, consumer = protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER
    return Permissions(
        publish_allow=(
            f"{API}.STREAM.INFO.{stream}",
            f"{API}.STREAM.CREATE.{stream}",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
            f"{API}.CONSUMER.CREATE.{stream}.{consumer}",
            f"{API}.CONSUMER.INFO.{stream}.{consumer}",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"{ACK}.{stream}.{consumer}.>",
            f"{protocol.DRAINED_SUBJECT_PREFIX}.*",
        ),
        publish_deny=(),
        subscribe_allow=(INBOX,),
    )


def worker(pipeline: str | None = None) -> Permissions:
    """Pull, ack and read the consumers of one pipeline's (None: every pipeline's) task stream,
    watch the registry, publish results and heartbeats.

    The registry watch is the one place a worker creates a consumer: an ordered push consumer on
    KV_mljob-registry, as every standard client's `kv.watch` makes it. nats-py creates it with
    the legacy ephemeral subject (`CONSUMER.CREATE.KV_mljob-registry`, where the server refuses a
    durable name) and reads its info; nats.go (both its APIs) names it and puts the filter in the
    subject (`CONSUMER.CREATE.KV_mljob-registry.<name>.$KV.mljob-registry.<keys>`: the server
    checks that filter against the config's, so the grant limits a scoped worker's nats.go watch
    to its pipeline's keys) and deletes it on Stop() and when it recreates it after a gap. Both
    answer flow control on `$JS.FC.KV_mljob-registry.>`. What permissions cannot limit: the
    legacy form's filter (any worker can read every registry entry), the named form's durability
    (a worker could leave read-only durables on the registry stream), whose watch a DELETE
    removes (its owner's client recreates it after two missed heartbeats, from where it was),
    and a consumer's deliver subject (nats-server checks no permission there; tested: its
    registry entries reach no stream and no JS API, only a literal subscriber of that subject).

    `MLJOB_TASKS_*` is no NATS wildcard (`*` matches whole tokens), so the all-pipelines worker
    gets `*` in the stream's place and the deny list takes the shared streams back out.
    """
    if pipeline is not None and not _PIPELINE.match(pipeline):
        raise ValueError(f"invalid pipeline {pipeline!r}: a DNS label (one NATS subject token) expected")
    stream = protocol.task_stream(pipeline) if pipeline else "*"
    token = pipeline or "*"
    keys = f"$KV.{protocol.REGISTRY_BUCKET}.{pipeline}.>" if pipeline else f"$KV.{protocol.REGISTRY_BUCKET}.>"
    shared = (protocol.RESULTS_STREAM, protocol.ADVISORY_STREAM, REGISTRY_STREAM)
    return Permissions(
        publish_allow=(
            f"{API}.STREAM.INFO.{REGISTRY_STREAM}",
            f"{API}.CONSUMER.CREATE.{REGISTRY_STREAM}",
            f"{API}.CONSUMER.CREATE.{REGISTRY_STREAM}.*.{keys}",
            f"{API}.CONSUMER.INFO.{REGISTRY_STREAM}.*",
            f"{API}.CONSUMER.DELETE.{REGISTRY_STREAM}.*",
            f"$JS.FC.{REGISTRY_STREAM}.>",
            f"{API}.CONSUMER.INFO.{stream}.*",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{ACK}.{stream}.>",
            f"{protocol.RESULTS_SUBJECT_PREFIX}.{token}.*",
            f"{protocol.HEARTBEAT_SUBJECT_PREFIX}.{token}.*",
        ),
        publish_deny=(
            *(f"{API}.CONSUMER.INFO.{s}.*" for s in shared if s != REGISTRY_STREAM),
            *(f"{API}.CONSUMER.MSG.NEXT.{s}.*" for s in shared),
            *(f"{ACK}.{s}.>" for s in shared),
            f"{protocol.TASK_SUBJECT_PREFIX}.>",
            f"$KV.{protocol.REGISTRY_BUCKET}.>",
        ),
        subscribe_allow=(INBOX,),
    )


def api() -> Permissions:
    """The read-only API (`mljob api`): the counters of the job consumers on the task streams
    (`consumer info`), nothing else: no pull, no ack, no publish, no stream or shared consumer.

    As for the all-pipelines worker, `*` stands in for the task streams (`MLJOB_TASKS_*` is no
    NATS wildcard) and the deny list takes the shared streams back out.
    """
    shared = (protocol.RESULTS_STREAM, protocol.ADVISORY_STREAM, REGISTRY_STREAM)
    return Permissions(
        publish_allow=(f"{API}.CONSUMER.INFO.*.*",),
        publish_deny=tuple(f"{API}.CONSUMER.INFO.{s}.*" for s in shared),
        subscribe_allow=(INBOX,),
    )


ROLES: dict[str, Callable[[], Permissions]] = {
    "operator": operator,
    "collector": collector,
    "worker": worker,
    "api": api,
}


def quote(value: str) -> str:
    """A double-quoted nats-server config string (`$` stays literal inside quotes)."""
    if any(ord(c) < 0x20 for c in value):
        raise ValueError(f"control character in {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(name: str, values: tuple[str, ...], indent: str) -> str:
    items = ",\n".join(f"{indent}  {quote(v)}" for v in values)
    return f"{indent}{name}: [\n{items}\n{indent}]\n"


def render_user(
    user: str, permissions: Permissions, password: str | None = None, password_env: str = ""
) -> str:
    """One entry of an account's `users` list. The password is a literal, or with `password_env`
    a `$VAR` reference that nats-server resolves from its environment (so no secret is pasted)."""
    if password is None and not password_env:
        raise ValueError("a password or the variable holding it is required")
    secret = quote(password) if password is not None else f"${password_env}"
    deny = _list("deny", permissions.publish_deny, "      ") if permissions.publish_deny else ""
    return (
        f"{{\n  user: {quote(user)}\n  password: {secret}\n  permissions {{\n"
        f"    publish {{\n{_list('allow', permissions.publish_allow, '      ')}{deny}    }}\n"
        f"    subscribe {{\n{_list('allow', permissions.subscribe_allow, '      ')}    }}\n"
        "  }\n}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mljob.ops.permissions",
        description="Print a nats-server `users` entry with the least privileges of an mljob role.",
    )
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--pipeline", help="worker only: limit it to this pipeline (default: every pipeline)")
    parser.add_argument("--user", help="user name (default: mljob-<role>[-<pipeline>])")
    parser.add_argument("--password-env", help="nats-server's variable with the password (default: derived)")
    args = parser.parse_args(argv)
    if args.pipeline is not None and args.role != "worker":
        parser.error("--pipeline applies to --role worker only")
    try:
        permissions = worker(args.pipeline) if args.role == "worker" else ROLES[args.role]()
    except ValueError as err:
        parser.error(str(err))
    user = args.user or "-".join(filter(None, ("mljob", args.role, args.pipeline)))
    env = args.password_env or re.sub(r"[^A-Z0-9]", "_", f"{user.upper()}_PASSWORD")
    print(f"# a users entry for your account; nats-server reads the password from ${env}")
    print(render_user(user, permissions, password_env=env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
