"""The NATS identities on a real nats-server (the stack's config, TLS and all): a worker can do
exactly its job, and each thing it must not do is refused by the server.

nats-py reports a refused publish or subscription only through error_cb ("Permissions Violation
for Publish to <subject>"), and a refused request just never gets its answer. So a refusal counts
only when that violation arrives for that exact subject: a timeout alone proves nothing. Where
it matters, the operator then checks that nothing changed. Runs on a private nats-server.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    StorageType,
    StreamConfig,
)

from mljob import protocol
from mljob.ops import permissions as nats_permissions
from mljob.transport.jspull import JobPuller
from mljob_dev.devstack import nats_config
from support.private_nats import OTHER, PIPELINE, SCOPED_WORKER, SPY, Identity, Server, World, connect
from support.waiting import eventually


def result(uid: str, item: str) -> tuple[bytes, dict[str, str]]:
    body = protocol.Result(job_uid=uid, item_id=item, outcome=protocol.Outcome.SUCCEEDED).encode()
    return body, {protocol.MSG_ID_HEADER: protocol.result_msg_id(uid, item)}


async def redelivered(puller: JobPuller) -> nats.aio.msg.Msg:
    """The next task; a NAK reaches the consumer a moment after it is sent."""
    async with asyncio.timeout(5):
        while not (msgs := await puller.fetch(1)):
            await asyncio.sleep(0.05)
    return msgs[0]


async def test_a_worker_can_watch_pull_ack_and_publish(world: World, worker: Identity) -> None:
    uid = await world.job(PIPELINE)
    heartbeats: list[str] = []

    async def on_heartbeat(msg: nats.aio.msg.Msg) -> None:
        heartbeats.append(msg.subject)

    await world.operator.nc.subscribe(f"{protocol.HEARTBEAT_SUBJECT_PREFIX}.>", cb=on_heartbeat)
    await world.operator.nc.flush()

    kv = await worker.js.key_value(protocol.REGISTRY_BUCKET)
    watcher = await kv.watch(f"{PIPELINE}.>")
    seen = set()
    while (update := await watcher.updates(timeout=5)) is not None:
        seen.add(update.key)
    assert protocol.registry_key(PIPELINE, uid) in seen
    later = await world.job(PIPELINE, tasks=0)
    update = await watcher.updates(timeout=5)
    assert update is not None and update.key == protocol.registry_key(PIPELINE, later)
    await (await world.operator.js.key_value(protocol.REGISTRY_BUCKET)).purge(update.key)
    gone = await watcher.updates(timeout=5)
    assert gone is not None and gone.key == update.key and gone.operation == "PURGE"
    await watcher.stop()  # type: ignore[no-untyped-call]

    stream, consumer = protocol.task_stream(PIPELINE), protocol.task_consumer(uid)
    info = await worker.js.consumer_info(stream, consumer)
    assert info.config.max_deliver == 5
    puller = JobPuller(worker.nc, stream, consumer)
    await puller.start()
    first, second = await puller.fetch(2)
    await first.in_progress()
    await worker.nc.publish(protocol.heartbeat_subject(PIPELINE, uid), b"")
    body, headers = result(uid, protocol.decode_task(first.data).item_id)
    ack = await worker.js.publish(protocol.results_subject(PIPELINE, uid), body, headers=headers)
    assert ack.stream == protocol.RESULTS_STREAM and not ack.duplicate
    await first.ack_sync(timeout=5)
    await second.nak()
    again = await redelivered(puller)
    assert again.metadata.num_delivered == 2
    await again.term()
    await puller.close()
    await worker.clean()

    # TERM is fire-and-forget: the server settles it a moment later.
    async def settled() -> bool:
        info = await world.operator.js.consumer_info(stream, consumer)
        return (info.num_pending, info.num_ack_pending) == (0, 0)

    await eventually(settled, 5, interval=0.1, what="the TERMed task to be settled")
    await world.operator.nc.flush()
    assert protocol.heartbeat_subject(PIPELINE, uid) in heartbeats


async def test_a_worker_answers_the_registry_watch_flow_control(
    world: World, worker: Identity, server: Server
) -> None:
    """The server asks a push consumer for flow control once over 1 MB is in flight; a watcher
    that could not answer on `$JS.FC.KV_mljob-registry.>` would stall there."""
    spy = await connect(server, SPY)
    answers: list[str] = []

    async def on_answer(msg: nats.aio.msg.Msg) -> None:
        answers.append(msg.subject)

    await spy.nc.subscribe(f"$JS.FC.KV_{protocol.REGISTRY_BUCKET}.>", cb=on_answer)
    await spy.nc.flush()
    kv = await world.operator.js.key_value(protocol.REGISTRY_BUCKET)
    keys = {f"bulk.{n}" for n in range(24)}
    for key in keys:
        await kv.put(key, b"x" * 100_000)
    watcher = await (await worker.js.key_value(protocol.REGISTRY_BUCKET)).watch("bulk.>")
    seen = set()
    while (update := await watcher.updates(timeout=5)) is not None:
        seen.add(update.key)
    await watcher.stop()  # type: ignore[no-untyped-call]
    await worker.clean()
    await spy.nc.flush()
    await spy.nc.close()
    assert seen == keys
    assert answers, "no flow control was asked for: the test proves nothing"
    for key in keys:
        await kv.purge(key)


async def test_a_worker_cannot_manage_streams(world: World, worker: Identity) -> None:
    await world.job(PIPELINE)
    tasks = protocol.task_stream(PIPELINE)
    before = await world.count(tasks)
    api = nats_permissions.API
    js = worker.js
    await worker.refused(f"{api}.STREAM.CREATE.EVIL", lambda: js.add_stream(name="EVIL", subjects=["evil.>"]))
    await worker.refused(f"{api}.STREAM.DELETE.{tasks}", lambda: js.delete_stream(tasks))
    await worker.refused(f"{api}.STREAM.PURGE.{tasks}", lambda: js.purge_stream(tasks))
    await worker.refused(
        f"{api}.STREAM.UPDATE.{tasks}",
        lambda: js.update_stream(StreamConfig(name=tasks, subjects=["mljob.tasks.>"])),
    )
    await worker.refused(
        f"{api}.STREAM.DELETE.{protocol.RESULTS_STREAM}", lambda: js.delete_stream(protocol.RESULTS_STREAM)
    )
    registry = f"KV_{protocol.REGISTRY_BUCKET}"
    await worker.refused(
        f"{api}.STREAM.DELETE.{registry}", lambda: js.delete_key_value(protocol.REGISTRY_BUCKET)
    )
    assert await world.count(tasks) == before
    for stream in (protocol.RESULTS_STREAM, registry):
        await world.operator.js.stream_info(stream)  # still there


async def test_a_worker_cannot_create_or_delete_consumers(world: World, worker: Identity) -> None:
    uid = await world.job(PIPELINE)
    api, js = nats_permissions.API, worker.js
    for stream in (protocol.task_stream(PIPELINE), protocol.RESULTS_STREAM):
        await worker.refused(
            f"{api}.CONSUMER.CREATE.{stream}",  # the ephemeral form, allowed on the registry only
            lambda stream=stream: js.add_consumer(stream, deliver_subject="_INBOX.evil"),
        )
    for stream in (protocol.task_stream(PIPELINE), protocol.RESULTS_STREAM, f"KV_{protocol.REGISTRY_BUCKET}"):
        await worker.refused(
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.evil",
            lambda stream=stream: js.add_consumer(stream, durable_name="evil"),
        )
        await worker.refused(
            f"{api}.CONSUMER.CREATE.{stream}.evil",
            lambda stream=stream: js.add_consumer(stream, name="evil"),
        )
    await worker.refused(
        f"{api}.CONSUMER.DELETE.{protocol.task_stream(PIPELINE)}.{protocol.task_consumer(uid)}",
        lambda: js.delete_consumer(protocol.task_stream(PIPELINE), protocol.task_consumer(uid)),
    )
    await worker.refused(
        f"{api}.CONSUMER.DELETE.{protocol.RESULTS_STREAM}.{protocol.RESULTS_CONSUMER}",
        lambda: js.delete_consumer(protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER),
    )
    await world.operator.js.consumer_info(protocol.task_stream(PIPELINE), protocol.task_consumer(uid))
    await world.operator.js.consumer_info(protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER)


async def test_a_worker_cannot_publish_tasks_or_write_the_registry(world: World, worker: Identity) -> None:
    uid = await world.job(PIPELINE)
    stream, subject = protocol.task_stream(PIPELINE), protocol.task_subject(PIPELINE, uid)
    before = await world.count(stream)
    await worker.refused(subject, lambda: worker.js.publish(subject, b"{}"))
    await worker.refused(
        "mljob.tasks.>", lambda: worker.nc.subscribe("mljob.tasks.>"), kind="subscription", request=False
    )
    await worker.refused(subject, lambda: worker.nc.publish(subject, b"{}"), request=False)
    key = protocol.registry_key(PIPELINE, uid)
    registry_subject = f"$KV.{protocol.REGISTRY_BUCKET}.{key}"
    kv = await worker.js.key_value(protocol.REGISTRY_BUCKET)
    await worker.refused(registry_subject, lambda: kv.put(key, b"{}"))
    await worker.refused(registry_subject, lambda: kv.delete(key))
    await worker.refused(registry_subject, lambda: kv.purge(key))
    fresh = f"$KV.{protocol.REGISTRY_BUCKET}.{PIPELINE}.forged"
    await worker.refused(fresh, lambda: kv.create(f"{PIPELINE}.forged", b"{}"))
    assert await world.count(stream) == before
    entry = await (await world.operator.js.key_value(protocol.REGISTRY_BUCKET)).get(key)
    assert entry.value and protocol.RegistryEntry.model_validate_json(entry.value).uid == uid


async def test_a_worker_cannot_touch_the_results_consumer(world: World, worker: Identity) -> None:
    uid = await world.job(PIPELINE)
    body, headers = result(uid, "item-0")
    await worker.js.publish(protocol.results_subject(PIPELINE, uid), body, headers=headers)
    stream, consumer = protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER
    api = nats_permissions.API
    puller = JobPuller(worker.nc, stream, consumer)
    await puller.start()
    await worker.refused(f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}", lambda: puller.fetch(1))
    await puller.close()
    await worker.refused(
        f"{api}.CONSUMER.INFO.{stream}.{consumer}", lambda: worker.js.consumer_info(stream, consumer)
    )
    # A result the collector holds: its ack subject is known, yet the worker's ack is refused.
    sub = await world.operator.js.pull_subscribe_bind(durable=consumer, stream=stream)
    (held,) = await sub.fetch(1, timeout=5)
    assert held.reply.startswith(f"{nats_permissions.ACK}.{stream}.{consumer}.")
    await worker.refused(held.reply, lambda: worker.nc.publish(held.reply, b"+ACK"), request=False)
    await worker.nc.flush()
    assert (await world.operator.js.consumer_info(stream, consumer)).num_ack_pending == 1
    await held.nak()
    await sub.unsubscribe()
    await worker.refused(
        "mljob.results.>",
        lambda: worker.nc.subscribe("mljob.results.>"),
        kind="subscription",
        request=False,
    )


async def test_a_pipeline_scoped_worker_stays_in_its_pipeline(world: World, server: Server) -> None:
    uid = await world.job(OTHER)
    scoped = await connect(server, SCOPED_WORKER)
    try:
        stream, consumer = protocol.task_stream(OTHER), protocol.task_consumer(uid)
        results_before = await world.count(protocol.RESULTS_STREAM)
        subject = protocol.results_subject(OTHER, uid)
        body, headers = result(uid, "item-0")
        await scoped.refused(subject, lambda: scoped.js.publish(subject, body, headers=headers))
        puller = JobPuller(scoped.nc, stream, consumer)
        await puller.start()
        api = nats_permissions.API
        await scoped.refused(f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}", lambda: puller.fetch(1))
        await puller.close()
        await scoped.refused(
            f"{api}.CONSUMER.INFO.{stream}.{consumer}", lambda: scoped.js.consumer_info(stream, consumer)
        )
        beat = protocol.heartbeat_subject(OTHER, uid)
        await scoped.refused(beat, lambda: scoped.nc.publish(beat, b""), request=False)
        assert await world.count(protocol.RESULTS_STREAM) == results_before
        assert (await world.operator.js.consumer_info(stream, consumer)).num_pending == 2
    finally:
        await scoped.nc.close()


async def test_the_collector_collects_and_can_do_nothing_else(world: World, server: Server) -> None:
    uid = await world.job(PIPELINE)
    producer = await connect(server, nats_config.WORKER_USER)
    collector = await connect(server, nats_config.COLLECTOR_USER)
    try:
        body, headers = result(uid, "item-1")
        await producer.js.publish(protocol.results_subject(PIPELINE, uid), body, headers=headers)
        js, stream, consumer = collector.js, protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER
        await js.stream_info(stream)
        config = (await world.operator.js.stream_info(stream)).config
        await js.add_stream(config)  # idempotent create, as on every collector start
        await js.add_consumer(stream, durable_name=consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
        sub = await js.pull_subscribe_bind(durable=consumer, stream=stream)
        found = False
        while not found:
            for msg in await sub.fetch(10, timeout=5):
                found = found or protocol.decode_result(msg.data).job_uid == uid
                await msg.ack_sync(timeout=5)
        await sub.unsubscribe()
        await collector.nc.publish(protocol.drained_subject(uid), b"")
        await collector.clean()

        task_subject = protocol.task_subject(PIPELINE, uid)
        await collector.refused(task_subject, lambda: js.publish(task_subject, b"{}"))
        tasks = protocol.task_stream(PIPELINE)
        api = nats_permissions.API
        await collector.refused(f"{api}.STREAM.DELETE.{tasks}", lambda: js.delete_stream(tasks))
        await collector.refused(f"{api}.STREAM.DELETE.{stream}", lambda: js.delete_stream(stream))
        await world.operator.js.stream_info(tasks)
    finally:
        await producer.nc.close()
        await collector.nc.close()


async def test_the_api_reads_job_consumer_counters_and_can_do_nothing_else(
    world: World, server: Server
) -> None:
    """The read-only API's identity: consumer info of a job's consumer (its summary's NATS part);
    no pull, ack, publish, stream info, or shared consumer."""
    uid = await world.job(PIPELINE, tasks=3)
    reader = await connect(server, nats_config.API_USER)
    try:
        js, api = reader.js, nats_permissions.API
        stream, consumer = protocol.task_stream(PIPELINE), protocol.task_consumer(uid)
        info = await js.consumer_info(stream, consumer)
        assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (3, 0, 0)
        await reader.clean()

        puller = JobPuller(reader.nc, stream, consumer)
        await puller.start()
        await reader.refused(f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}", lambda: puller.fetch(1))
        await puller.close()
        subject = protocol.task_subject(PIPELINE, uid)
        await reader.refused(subject, lambda: js.publish(subject, b"{}"))
        await reader.refused(f"{api}.STREAM.INFO.{stream}", lambda: js.stream_info(stream))
        await reader.refused(f"{api}.STREAM.DELETE.{stream}", lambda: js.delete_stream(stream))
        await reader.refused(
            f"{api}.CONSUMER.DELETE.{stream}.{consumer}", lambda: js.delete_consumer(stream, consumer)
        )
        results, collector = protocol.RESULTS_STREAM, protocol.RESULTS_CONSUMER
        await reader.refused(
            f"{api}.CONSUMER.INFO.{results}.{collector}", lambda: js.consumer_info(results, collector)
        )
        await reader.refused(
            "mljob.results.>",
            lambda: reader.nc.subscribe("mljob.results.>"),
            kind="subscription",
            request=False,
        )
        assert (await world.operator.js.consumer_info(stream, consumer)).num_pending == 3
    finally:
        await reader.nc.close()


async def test_the_operator_captures_max_deliveries_advisories_in_its_account(
    world: World, server: Server
) -> None:
    """Advisories are published in the account that owns the consumer, so MLJOB_ADVISORIES sees
    them with accounts configured too; the operator reads and acks them with its own consumer."""
    js = world.operator.js
    await js.add_stream(
        StreamConfig(
            name=protocol.ADVISORY_STREAM,
            subjects=[protocol.MAX_DELIVERIES_ADVISORY_SUBJECTS],
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        protocol.ADVISORY_STREAM,
        ConsumerConfig(durable_name=protocol.ADVISORY_CONSUMER, ack_policy=AckPolicy.EXPLICIT),
    )
    uid = await world.job(PIPELINE, tasks=1, max_deliver=1)
    stream, consumer = protocol.task_stream(PIPELINE), protocol.task_consumer(uid)
    worker = await connect(server, nats_config.WORKER_USER)
    puller = JobPuller(worker.nc, stream, consumer)
    await puller.start()
    (task,) = await puller.fetch(1)
    await task.nak()
    await worker.nc.flush()
    await asyncio.sleep(0.2)  # the NAK reaches the consumer a moment after it is sent
    assert await puller.fetch(1) == []  # its deliveries are used up: the server advises instead
    await puller.close()
    await worker.clean()
    await worker.nc.close()
    sub = await js.pull_subscribe_bind(durable=protocol.ADVISORY_CONSUMER, stream=protocol.ADVISORY_STREAM)
    msgs = await sub.fetch(10, timeout=5)
    advisories = [json.loads(m.data) for m in msgs]
    assert any(a["stream"] == stream and a["consumer"] == consumer for a in advisories), advisories
    for msg in msgs:
        await msg.ack_sync(timeout=5)
    await sub.unsubscribe()
    assert (await js.get_msg(stream, task.metadata.sequence.stream)).data == task.data


@pytest.mark.parametrize(
    ("user", "password"),
    [("nobody", "whatever"), (nats_config.WORKER_USER, "wrong"), (nats_config.OPERATOR_USER, "")],
)
async def test_an_unknown_user_or_wrong_password_is_refused(server: Server, user: str, password: str) -> None:
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    client = Client()
    with pytest.raises(Exception):  # noqa: B017 - what matters is the server's reason, below
        await client.connect(
            servers=[server.config.url],
            user=user,
            password=password,
            tls=ssl.create_default_context(cafile=str(server.config.ca_cert)),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )
    assert any("authorization violation" in str(e).lower() for e in errors), errors
    assert not client.is_connected
