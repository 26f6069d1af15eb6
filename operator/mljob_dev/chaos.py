"""`mljob chaos`: inflict, on purpose, the faults the operator must survive; for runbooks and tests.

Each job-level command takes the job as NAMESPACE/NAME (resolved through the Kubernetes API)
or as --uid. Connections come from the operator's own settings (MLJOB_* environment and
KUBECONFIG), made once with short timeouts: a runbook tool must fail fast, never retry forever
the way the operator does at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from nats.js.errors import NotFoundError

from mljob import protocol
from mljob.adapters.kube import Kube
from mljob.adapters.services import Services, assemble
from mljob.ops import logs
from mljob.settings import OperatorSettings, load

#: The connections' logger: a runbook command prints its own one line, not NATS's reconnects.
QUIET = logging.getLogger("mljob.chaos")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


class ChaosError(Exception):
    """A problem to report in one line (exit status 1), never a traceback."""


@dataclass(frozen=True)
class Target:
    uid: str
    pipeline: str | None
    label: str  # how to name the job to a human


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("chaos", help="inject faults and inspect orphans (runbooks, tests)")
    sub = parser.add_subparsers(dest="chaos", required=True)

    flush = sub.add_parser("flush-state", help="delete one job's Redis keys (what FLUSHALL does to it)")
    _job_args(flush)
    flush.set_defaults(func=_run, action=flush_state)

    stream = sub.add_parser(
        "delete-stream",
        help="delete the task stream of a job's pipeline, as a NATS storage loss does (every job of "
        "the pipeline loses its tasks and consumer)",
    )
    _job_args(stream)
    stream.add_argument(
        "--consumer-only", action="store_true", help="delete only the job's consumer, keep the stream"
    )
    stream.set_defaults(func=_run, action=delete_stream)

    exhaust = sub.add_parser(
        "exhaust",
        help="announce that chosen items' deliveries ran out, as JetStream does (a max-deliveries "
        "advisory for each of their task messages)",
    )
    _job_args(exhaust)
    exhaust.add_argument("--items", required=True, help="comma-separated item ids")
    exhaust.set_defaults(func=_run, action=exhaust_items)

    plant = sub.add_parser("plant-orphans", help="create streams, registry entries, Redis keys of no MLJob")
    plant.add_argument("--count", type=int, default=1, help="how many orphan jobs (default: 1)")
    plant.add_argument("--pipeline", default="chaos", help="pipeline of the orphans (default: chaos)")
    plant.add_argument(
        "--namespace",
        help="owner namespace: named in the registry entries, and a Postgres job row is written "
        "so an operator watching this namespace owns them (default: no owner)",
    )
    plant.set_defaults(func=_run, action=plant_orphans)

    listing = sub.add_parser("list-orphans", help="show what the orphan sweep would remove (dry run)")
    listing.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="as an operator watching this namespace (repeatable); default: MLJOB_NAMESPACES, else "
        "cluster-wide",
    )
    listing.add_argument("--grace", type=float, help="grace period in seconds (default: the operator's)")
    listing.set_defaults(func=_run, action=list_orphans)


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", nargs="?", metavar="NAMESPACE/NAME", help="the MLJob")
    parser.add_argument("--uid", help="the job's UID instead (works after the MLJob is gone)")


def _run(args: argparse.Namespace) -> int:
    logs.drop_noise()  # no logging set up here: asyncio's TLS teardown line would reach stderr
    try:
        code: int = asyncio.run(args.action(args, load(OperatorSettings)))
    except ChaosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return code


async def open_services(settings: OperatorSettings, kube: Kube | None = None) -> Services:
    """Every connection the operator has, each tried once; ChaosError names the one that failed."""
    from mljob.adapters import bootstrap
    from mljob.adapters.kube import load_config
    from mljob.transport import natsconn

    try:
        opened = await bootstrap.open_connections(
            settings, name="mljob-chaos", log=QUIET, streams=("registry",), pool_size=2, once=True
        )
    except (bootstrap.Unreachable, natsconn.CannotStart) as err:
        raise ChaosError(str(err)) from err
    assert opened.registry is not None  # asked for
    try:
        kube = kube or Kube(load_config())
    except Exception as err:
        await opened.close()
        raise ChaosError(f"no Kubernetes configuration: {err}") from err
    return assemble(settings, opened.nc, opened.registry, opened.redis, opened.pool, kube)


async def resolve(services: Services, job: str | None, uid: str | None) -> Target:
    """NAMESPACE/NAME through the Kubernetes API, or a bare --uid (pipeline then unknown)."""
    if uid:
        return Target(uid=uid, pipeline=None, label=f"job {uid}")
    if not job or job.count("/") != 1:
        raise ChaosError("give the job as NAMESPACE/NAME or --uid UID")
    namespace, name = job.split("/")
    body = await services.kube.get_job(namespace, name)
    if body is None:
        raise ChaosError(f"no MLJob {namespace}/{name}")
    found = str(body["metadata"]["uid"])
    return Target(found, str((body.get("spec") or {}).get("pipeline") or ""), f"{job} (uid {found})")


async def flush_state(args: argparse.Namespace, settings: OperatorSettings) -> int:
    """Every Redis key of the job, staging sets included: the job's share of a FLUSHALL."""
    services = await open_services(settings)
    try:
        target = await resolve(services, args.job, args.uid)
        pattern = f"{settings.redis_prefix}:{{{target.uid}}}:*"
        keys = sorted(_text(k) for k in [k async for k in services.redis.scan_iter(match=pattern)])
        if keys:
            await services.redis.delete(*keys)
            print(f"deleted {len(keys)} Redis key(s) of {target.label}:")
            for key in keys:
                print(f"  {key}")
        else:
            print(f"{target.label} has no Redis keys under {pattern}")
    finally:
        await services.close()
    return 0


async def pipeline_of(services: Services, target: Target) -> str:
    """The job's pipeline: from the MLJob, else (a bare --uid) from its consumer in NATS."""
    from mljob.adapters import jetstream

    if target.pipeline:
        return target.pipeline
    for consumer in await jetstream.list_job_consumers(services.js):
        if consumer.uid == target.uid:
            return consumer.pipeline
    raise ChaosError(f"{target.label} has no consumer on any pipeline's task stream")


async def delete_stream(args: argparse.Namespace, settings: OperatorSettings) -> int:
    services = await open_services(settings)
    try:
        target = await resolve(services, args.job, args.uid)
        pipeline = await pipeline_of(services, target)
        stream, consumer = protocol.task_stream(pipeline), protocol.task_consumer(target.uid)
        try:
            if args.consumer_only:
                await services.js.delete_consumer(stream, consumer)
                print(f"deleted consumer {consumer} of {target.label} on {stream}")
            else:
                await services.js.delete_stream(stream)
                print(f"deleted stream {stream} (every job of pipeline {pipeline} lost its tasks), "
                      f"{target.label} among them")  # fmt: skip
        except NotFoundError:
            missing = f"consumer {consumer}" if args.consumer_only else f"stream {stream}"
            print(f"{target.label} has no {missing}")
    finally:
        await services.close()
    return 0


async def exhaust_items(args: argparse.Namespace, settings: OperatorSettings) -> int:
    """Publish, for each chosen item still in the job's stream, the advisory JetStream sends when
    its deliveries run out. Only the chosen items are touched (no delivery is used up), so a
    runbook can show the operator's handling on a live job. A real exhaustion needs a worker that
    dies on the item every time (see docs/operations.md)."""
    import json
    import uuid
    from datetime import UTC, datetime

    wanted = {item.strip() for item in args.items.split(",") if item.strip()}
    services = await open_services(settings)
    try:
        target = await resolve(services, args.job, args.uid)
        pipeline = await pipeline_of(services, target)
        subject = protocol.task_subject(pipeline, target.uid)
        stream, consumer = protocol.task_stream(pipeline), protocol.task_consumer(target.uid)
        try:
            info = await services.js.consumer_info(stream, consumer)
            state = (await services.js.stream_info(stream)).state
        except Exception as err:
            raise ChaosError(f"{target.label} has no stream or consumer: {err}") from err
        found: dict[str, int] = {}
        for seq in range(state.first_seq, state.last_seq + 1):
            if len(found) == len(wanted):
                break
            try:
                msg = await services.js.get_msg(stream, seq)
            except Exception:
                continue  # acked (removed) or deleted
            if msg.subject != subject:
                continue  # another job's task
            msg_id = str((msg.headers or {}).get(protocol.MSG_ID_HEADER, ""))
            item_id = msg_id.partition(":")[2]
            if item_id in wanted:
                found[item_id] = seq
        subject = protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS.replace("*.*", f"{stream}.{consumer}")
        for item_id, seq in sorted(found.items(), key=lambda kv: kv[1]):
            advisory = {
                "type": "io.nats.jetstream.advisory.v1.max_deliver",
                "id": uuid.uuid4().hex,
                "timestamp": datetime.now(UTC).isoformat(),
                "stream": stream,
                "consumer": consumer,
                "stream_seq": seq,
                "deliveries": int(info.config.max_deliver or 0),
            }
            await services.nc.publish(subject, json.dumps(advisory).encode())
            print(
                f"announced exhausted deliveries of item {item_id} (stream sequence {seq}) of {target.label}"
            )
        await services.nc.flush()
        for item_id in sorted(wanted - set(found)):
            print(f"item {item_id} has no task in {stream} (finished already, or not an item)")
    finally:
        await services.close()
    return 0 if found else 1


async def plant(
    services: Services, pipeline: str, namespace: str | None = None, uid: str | None = None
) -> str:
    """One job's worth of resources, exactly as dispatch leaves them: stream + consumer, registry
    entry, item state; plus a Postgres job row owned by `namespace` when one is given."""
    from mljob.adapters import jetstream

    uid = uid or str(uuid.uuid4())
    name = f"orphan-{uid[:8]}"
    entry = await jetstream.ensure_job_stream(
        services.js,
        jetstream.JobStreamSettings(uid=uid, namespace=namespace or "", name=name, pipeline=pipeline),
    )
    await jetstream.register_job(services.registry, entry)
    await services.state.initialize(uid, [f"item-{i}" for i in range(3)])
    if namespace:
        await services.jobs.ensure(uid, namespace, name, pipeline, {})
    return uid


async def plant_orphans(args: argparse.Namespace, settings: OperatorSettings) -> int:
    if args.count < 1:
        raise ChaosError("--count must be at least 1")
    services = await open_services(settings)
    try:
        for _ in range(args.count):
            print(await plant(services, args.pipeline, args.namespace), flush=True)
    finally:
        await services.close()
    owner = f"owned by namespace {args.namespace}" if args.namespace else "with no owner"
    print(f"planted {args.count} orphan job(s) {owner}, pipeline {args.pipeline}", file=sys.stderr)
    return 0


async def list_orphans(args: argparse.Namespace, settings: OperatorSettings) -> int:
    from mljob.controller.sweep import describe, find_orphans

    if args.namespace:
        settings.namespaces = list(args.namespace)
    if args.grace is not None:
        settings.orphan_grace_seconds = args.grace
    services = await open_services(settings)
    try:
        try:
            seen, orphans = await find_orphans(services)
        except Exception as err:
            raise ChaosError(f"no complete view, the sweep would skip: {type(err).__name__}: {err}") from err
    finally:
        await services.close()
    scope = ", ".join(settings.namespaces) if settings.namespaces else "cluster-wide"
    for orphan in orphans:
        print(describe(orphan))
    print(
        f"{len(orphans)} of {len(seen.resources)} observed resource(s) would be removed "
        f"(scope: {scope}; grace: {settings.orphan_grace_seconds:g}s)"
    )
    return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
