"""jspull.JobPuller's lingering fetch (the collector's and the advisory watcher's), on REAL NATS.

A lingering request stays open on the server; the fetch returns as soon as anything arrived
(a collector must not wait to fill its batch), and what the open request delivers afterwards is
kept for the next fetch, or handed back by `close` at once instead of waiting for ack_wait (and
not redelivered to the closed puller's request, still open on the server).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from mljob.transport.jspull import JobPuller

#: A bound against a hang, far above what a delivery on loopback takes (not a timing).
BOUND = 20.0


@pytest.fixture
async def consumer(nc: NATS) -> AsyncIterator[tuple[str, str, str]]:
    """(stream, consumer, subject): a fresh stream with one durable pull consumer."""
    name = f"JSPULL_{uuid.uuid4().hex[:8]}"
    subject = f"test.jspull.{name}"
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[subject]))
    await js.add_consumer(name, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=600))
    yield name, "c", subject
    await js.delete_stream(name)


async def delivered(nc: NATS, stream: str, durable: str, count: int) -> None:
    """Until `count` messages are out with a puller (delivered, not acked)."""
    while (await nc.jetstream().consumer_info(stream, durable)).num_ack_pending != count:
        await asyncio.sleep(0.05)


async def test_a_lingering_fetch_returns_as_soon_as_a_message_arrives(
    nc: NATS, consumer: tuple[str, str, str]
) -> None:
    stream, durable, subject = consumer
    puller = JobPuller(nc, stream, durable)
    await puller.start()
    fetching = asyncio.create_task(puller.fetch(10, linger=600))
    await asyncio.sleep(0.2)  # the request is out (had it not been, the message is still taken)
    await nc.jetstream().publish(subject, b"first")
    msgs = await asyncio.wait_for(fetching, BOUND)  # not the 600 s the request lingers
    assert [m.data for m in msgs] == [b"first"]
    await msgs[0].ack()
    await puller.close()


async def test_a_lingering_fetch_with_nothing_to_take_returns_empty(
    nc: NATS, consumer: tuple[str, str, str]
) -> None:
    stream, durable, _ = consumer
    puller = JobPuller(nc, stream, durable)
    await puller.start()
    assert await asyncio.wait_for(puller.fetch(10, linger=0.5), BOUND) == []
    await puller.close()


async def test_later_deliveries_of_the_open_request_are_kept_and_close_hands_them_back(
    nc: NATS, consumer: tuple[str, str, str]
) -> None:
    stream, durable, subject = consumer
    js = nc.jetstream()
    puller = JobPuller(nc, stream, durable)
    await puller.start()
    await js.publish(subject, b"m0")
    first = await asyncio.wait_for(puller.fetch(5, linger=2), BOUND)
    assert [m.data for m in first] == [b"m0"]
    for n in (1, 2, 3):  # delivered on the request still open (batch 5, one taken)
        await js.publish(subject, f"m{n}".encode())

    await asyncio.wait_for(delivered(nc, stream, durable, 4), BOUND)
    assert await puller.close() == 3  # kept, never handed out: NAKed
    again = JobPuller(nc, stream, durable)  # the next consumer gets them now, not after ack_wait
    await again.start()

    async def three() -> list[Msg]:
        got: list[Msg] = []
        while len(got) < 3:
            got += await again.fetch(5, linger=5)
        return got

    redelivered = await asyncio.wait_for(three(), BOUND)  # ack_wait is 600 s: only a NAK is this fast
    assert sorted(m.data for m in redelivered) == [b"m1", b"m2", b"m3"]
    assert all(m.metadata.num_delivered == 2 for m in redelivered)
    for msg in redelivered:
        await msg.ack()
    await again.close()
    await first[0].ack()


async def test_the_next_fetch_hands_out_what_the_open_request_delivered(
    nc: NATS, consumer: tuple[str, str, str]
) -> None:
    stream, durable, subject = consumer
    js = nc.jetstream()
    puller = JobPuller(nc, stream, durable)
    await puller.start()
    await js.publish(subject, b"m0")
    assert len(await asyncio.wait_for(puller.fetch(5, linger=600), BOUND)) == 1
    for n in (1, 2):
        await js.publish(subject, f"m{n}".encode())
    await asyncio.wait_for(delivered(nc, stream, durable, 3), BOUND)
    later = await asyncio.wait_for(puller.fetch(5, linger=600), BOUND)
    assert [m.data for m in later] == [b"m1", b"m2"]
    for msg in later:
        await msg.ack()
    await puller.close()
