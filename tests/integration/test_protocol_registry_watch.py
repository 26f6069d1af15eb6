"""The registry watch of docs/protocol.md ("The registry", "NATS permissions") with the worker's
own NATS identity, on real nats-servers.

* On the running stack (its config, TLS and users): nats-py's standard `kv.watchall()` and
  `kv.watch("<pipeline>.*")` as the stack's worker identity see what the operator identity puts
  and purges.
* nats.go's `kv.Watch` cannot run here (Go builds infrastructure binaries only), so its requests
  are sent as nats.go sends them (nats.go kv.go `WatchFiltered` -> js.go `Subscribe` with
  `OrderedConsumer()` -> jsm.go `upsertConsumer`): a consumer named by the client with the filter
  in the subject, `$JS.API.CONSUMER.CREATE.KV_mljob-registry.<name>.$KV.mljob-registry.<keys>`,
  the ordered push config, and `$JS.API.CONSUMER.DELETE.KV_mljob-registry.<name>` on Stop().
  These run on the private server of tests/support/private_nats.py (the `server`, `world` and
  `worker` fixtures of tests/integration/conftest.py), which also has a worker scoped to one
  pipeline, and count a refusal only when the server reports it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from mljob import protocol
from mljob.adapters.jetstream import registry
from mljob.ops import permissions as nats_permissions
from support.private_nats import OTHER, PIPELINE, SCOPED_WORKER, Identity, Server, World, connect
from support.stack import StackEnv

REGISTRY_STREAM = f"KV_{protocol.REGISTRY_BUCKET}"
KEY_PREFIX = f"$KV.{protocol.REGISTRY_BUCKET}."
WAIT_SECONDS = 30.0  # an upper bound for waiting, never a timing assertion
SECOND = 1_000_000_000


def entry_for(pipeline: str, uid: str) -> protocol.RegistryEntry:
    return protocol.RegistryEntry(
        uid=uid,
        namespace="ns",
        name="watched",
        pipeline=pipeline,
        stream=protocol.task_stream(pipeline),
        consumer=protocol.task_consumer(uid),
        subject=protocol.task_subject(pipeline, uid),
        created=protocol.utcnow(),
    )


async def until_key(watcher: KeyValue.KeyWatcher, key: str) -> KeyValue.Entry:
    """The watcher's next update of `key`, skipping the initial snapshot's end and other keys."""
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            update: KeyValue.Entry | None = await watcher.updates(timeout=WAIT_SECONDS)  # type: ignore[no-untyped-call]
            if update is not None and update.key == key:
                return update


# --------------------------------------------------------------------------- the stack, nats-py


@pytest.fixture
async def operator_kv(stack: StackEnv) -> AsyncIterator[KeyValue]:
    nc = await stack.nats("operator")
    try:
        yield await registry(nc.jetstream())
    finally:
        await nc.close()


@pytest.fixture
async def worker_nc(stack: StackEnv) -> AsyncIterator[Client]:
    assert stack.nats_identity("worker").get("MLJOB_NATS_USER"), "the stack exports no worker identity"
    nc = await stack.nats("worker")
    try:
        yield nc
    finally:
        await nc.close()


async def test_the_worker_identity_watches_the_registry_with_nats_py(
    operator_kv: KeyValue, worker_nc: Client
) -> None:
    pipeline, uid = f"rw{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    key = protocol.registry_key(pipeline, uid)
    kv = await worker_nc.jetstream().key_value(protocol.REGISTRY_BUCKET)
    everything = await kv.watchall()
    one_pipeline = await kv.watch(f"{pipeline}.*")
    try:
        await operator_kv.put(key, entry_for(pipeline, uid).encode())
        for watcher in (everything, one_pipeline):
            update = await until_key(watcher, key)
            assert update.operation is None and update.value is not None
            assert protocol.RegistryEntry.model_validate_json(update.value).uid == uid
        await operator_kv.purge(key)
        for watcher in (everything, one_pipeline):
            assert (await until_key(watcher, key)).operation == "PURGE"
    finally:
        await everything.stop()  # type: ignore[no-untyped-call]
        await one_pipeline.stop()  # type: ignore[no-untyped-call]
        await operator_kv.purge(key)


# --------------------------------------------------------------------------- nats.go's requests


def nats_go_ordered_config(name: str, deliver: str, keys: str) -> dict[str, object]:
    """The consumer config nats.go's kv.Watch sends (js.go: OrderedConsumer, DeliverLastPerSubject)."""
    return {
        "name": name,
        "deliver_subject": deliver,
        "deliver_policy": "last_per_subject",
        "ack_policy": "none",
        "ack_wait": 22 * 3600 * SECOND,
        "max_deliver": 1,
        "filter_subject": keys,
        "replay_policy": "instant",
        "flow_control": True,
        "idle_heartbeat": 5 * SECOND,
        "num_replicas": 1,
        "mem_storage": True,
    }


def create_request(name: str, deliver: str, keys: str) -> tuple[str, dict[str, object]]:
    """nats.go's create request: the filter in the subject (jsm.go apiConsumerCreateWithFilterSubjectT)."""
    subject = f"{nats_permissions.API}.CONSUMER.CREATE.{REGISTRY_STREAM}.{name}.{keys}"
    return subject, {"stream_name": REGISTRY_STREAM, "config": nats_go_ordered_config(name, deliver, keys)}


Json = Mapping[str, object]


async def api(identity: Identity, subject: str, body: Json | None = None) -> dict[str, object]:
    reply = await identity.nc.request(subject, json.dumps(body).encode() if body else b"", timeout=5)
    answer: dict[str, object] = json.loads(reply.data)
    assert "error" not in answer, answer
    return answer


async def nats_go_watch(identity: Identity, keys: str) -> tuple[str, asyncio.Queue[Msg]]:
    """Create the watch consumer as nats.go does; returns its name and its deliveries."""
    name = uuid.uuid4().hex[:22]  # nats.go: getHash(nuid.Next())
    deliver = identity.nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    await identity.nc.subscribe(deliver, cb=queue.put)
    created = await api(identity, *create_request(name, deliver, keys))
    assert created["name"] == name
    return name, queue


async def delivered(queue: asyncio.Queue[Msg], key: str) -> Msg:
    """The next delivery of `key`, skipping heartbeats (status 100) and other keys."""
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            msg = await queue.get()
            if msg.subject == f"{KEY_PREFIX}{key}":
                return msg


async def test_nats_go_watch_requests_are_allowed(world: World, worker: Identity) -> None:
    """Both the all-pipelines and the scoped worker: create (filter in the subject), receive
    the initial value and a later put, delete on Stop()."""
    first = await world.job(PIPELINE, tasks=0)
    name, queue = await nats_go_watch(worker, f"{KEY_PREFIX}{PIPELINE}.>")
    msg = await delivered(queue, protocol.registry_key(PIPELINE, first))
    assert protocol.RegistryEntry.model_validate_json(msg.data).uid == first
    later = await world.job(PIPELINE, tasks=0)
    msg = await delivered(queue, protocol.registry_key(PIPELINE, later))
    assert msg.metadata.stream == REGISTRY_STREAM  # an ack subject nats.go reads revisions from
    deleted = await api(worker, f"{nats_permissions.API}.CONSUMER.DELETE.{REGISTRY_STREAM}.{name}")
    assert deleted["success"] is True
    await worker.clean()


async def test_a_scoped_worker_watches_only_its_pipeline_with_the_named_form(
    world: World, server: Server
) -> None:
    scoped = await connect(server, SCOPED_WORKER)
    try:
        for keys in (f"{KEY_PREFIX}{OTHER}.>", f"{KEY_PREFIX}>", f"{KEY_PREFIX}*.*"):
            subject, body = create_request("evil", "_INBOX.evil", keys)

            async def create(subject: str = subject, body: Json = body) -> object:
                return await api(scoped, subject, body)

            await scoped.refused(subject, create)
    finally:
        await scoped.nc.close()


async def test_the_named_form_creates_consumers_on_the_registry_only(world: World, worker: Identity) -> None:
    """The grant that lets nats.go watch lets a worker create no consumer on any other stream,
    nor one on the registry without a filter in the subject; deleting stays registry-only."""
    uid = await world.job(PIPELINE)
    js, api_prefix = worker.js, nats_permissions.API
    tasks = protocol.task_stream(PIPELINE)
    for stream, keys in (
        (tasks, protocol.task_stream_subjects(PIPELINE)),
        (protocol.RESULTS_STREAM, f"{protocol.RESULTS_SUBJECT_PREFIX}.>"),
    ):

        async def create(stream: str = stream, keys: str = keys) -> object:
            return await js.add_consumer(
                stream, name="evil", filter_subject=keys, deliver_subject="_INBOX.evil"
            )

        await worker.refused(f"{api_prefix}.CONSUMER.CREATE.{stream}.evil.{keys}", create)
    await worker.refused(
        f"{api_prefix}.CONSUMER.CREATE.{REGISTRY_STREAM}.evil",
        lambda: js.add_consumer(REGISTRY_STREAM, name="evil", deliver_subject="_INBOX.evil"),
    )
    consumer = protocol.task_consumer(uid)
    await worker.refused(
        f"{api_prefix}.CONSUMER.DELETE.{tasks}.{consumer}", lambda: js.delete_consumer(tasks, consumer)
    )
    await world.operator.js.consumer_info(tasks, consumer)  # still there


async def test_a_watch_whose_consumer_another_worker_deletes_recovers(world: World, server: Server) -> None:
    """What the DELETE grant allows at worst: removing another client's watch consumer. nats-py
    (the reference worker's client) misses two heartbeats, recreates it from where it was, and
    still sees every later change."""
    watcher_identity = await connect(server, SCOPED_WORKER)
    vandal = await connect(server, SCOPED_WORKER)
    try:
        kv = await watcher_identity.js.key_value(protocol.REGISTRY_BUCKET)
        watcher = await kv.watch(f"{PIPELINE}.>")
        names = await world.operator.js.consumers_info(REGISTRY_STREAM)
        assert names, "the watch made no consumer"
        for info in names:
            await api(vandal, f"{nats_permissions.API}.CONSUMER.DELETE.{REGISTRY_STREAM}.{info.name}")
        uid = await world.job(PIPELINE, tasks=0)
        update = await until_key(watcher, protocol.registry_key(PIPELINE, uid))
        assert update.value is not None
        assert protocol.RegistryEntry.model_validate_json(update.value).uid == uid
        await watcher.stop()  # type: ignore[no-untyped-call]
    finally:
        await watcher_identity.nc.close()
        await vandal.nc.close()
