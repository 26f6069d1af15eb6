"""The one confirmed-publish helper: the window, the bounds, the confirmed prefix.

Unit tests drive a stand-in JetStream context whose acks the test answers, loses or refuses;
the same helper against the real nats-server is in tests/e2e/test_e2e_dispatch_outage.py and in
`test_publish_confirmed_against_the_real_stream` below.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from nats.js.errors import APIError

from mljob import protocol
from mljob.adapters import jetstream
from mljob.transport.jspublish import (
    YIELD_EVERY,
    ConfirmedPublisher,
    Outgoing,
    PubAckTimeout,
    publish_confirmed,
)


class AckControlledJS:
    """publish_async whose futures the test settles; `answer` decides per message at send time."""

    def __init__(self, answer: str = "ack") -> None:
        self.answer = answer  # ack | lose | refuse | later
        self.sent: list[str] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.fail_send_at: int | None = None

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Any]:
        if self.fail_send_at is not None and len(self.sent) == self.fail_send_at:
            raise ConnectionError("nats: connection closed")
        self.sent.append(headers[protocol.MSG_ID_HEADER])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        if self.answer == "ack":
            future.set_result(object())
        elif self.answer == "refuse":
            future.set_exception(APIError(code=503, description="no space"))
        return future


def messages(n: int) -> list[Outgoing]:
    return [Outgoing("mljob.tasks.p.u", b"{}", f"u:{i}") for i in range(n)]


@pytest.mark.unit
async def test_every_message_confirmed_means_no_failures() -> None:
    js = AckControlledJS("ack")
    assert await publish_confirmed(js, messages(10), timeout=1.0) == {}
    assert js.sent == [f"u:{i}" for i in range(10)]


@pytest.mark.unit
async def test_a_long_send_gives_the_process_other_work_turns() -> None:
    """The operator's in-process collector shares the event loop with dispatch: a send of
    thousands of messages whose acks keep up must not hold the loop from start to end."""
    js = AckControlledJS("ack")
    seen: list[int] = []

    async def other_work() -> None:
        while True:
            seen.append(len(js.sent))
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    assert await publish_confirmed(js, messages(4 * YIELD_EVERY), timeout=1.0) == {}
    other.cancel()
    assert any(0 < sent < 4 * YIELD_EVERY for sent in seen), seen  # it ran in the middle


@pytest.mark.unit
async def test_a_lost_ack_is_a_timeout_after_the_bound_not_a_hang() -> None:
    """The defect of issue 13 section 4: nats-py's future for a lost PubAck waits forever."""
    js = AckControlledJS("lose")
    failures = await asyncio.wait_for(publish_confirmed(js, messages(3), timeout=0.05), 5)
    assert sorted(failures) == [0, 1, 2]
    assert all(isinstance(e, PubAckTimeout) for e in failures.values())
    assert all(f.cancelled() for f in js.futures), "what is left is cancelled, freeing nats-py's window"


@pytest.mark.unit
async def test_a_full_window_of_lost_acks_stops_sending_within_the_bound() -> None:
    js = AckControlledJS("lose")
    failures = await asyncio.wait_for(publish_confirmed(js, messages(20), timeout=0.05, window=4), 5)
    assert len(js.sent) == 4, "nothing past the window is sent while no ack comes"
    assert sorted(failures) == list(range(20))


@pytest.mark.unit
async def test_a_refusal_is_reported_with_the_servers_error() -> None:
    js = AckControlledJS("refuse")
    failures = await publish_confirmed(js, messages(2), timeout=1.0)
    assert isinstance(failures[0], APIError)


@pytest.mark.unit
async def test_a_client_error_fails_the_rest_without_sending_them() -> None:
    js = AckControlledJS("ack")
    js.fail_send_at = 3
    failures = await publish_confirmed(js, messages(6), timeout=1.0)
    assert len(js.sent) == 3
    assert sorted(failures) == [3, 4, 5]
    assert all(isinstance(e, ConnectionError) for e in failures.values())


@pytest.mark.unit
async def test_confirmed_is_the_prefix_whose_every_ack_came_in() -> None:
    js = AckControlledJS("later")
    publisher = ConfirmedPublisher(js, timeout=1.0)
    await publisher.send(messages(5))
    for index in (0, 1, 3, 4):  # the ack of message 2 is late
        js.futures[index].set_result(object())
    await asyncio.sleep(0)
    assert publisher.confirmed == 2
    js.futures[2].set_result(object())
    await asyncio.sleep(0)
    assert publisher.confirmed == 5
    assert await publisher.drain() == {}


@pytest.mark.unit
async def test_sends_after_a_failure_are_refused_so_the_caller_resumes_in_order() -> None:
    js = AckControlledJS("later")
    publisher = ConfirmedPublisher(js, timeout=1.0)
    await publisher.send(messages(2))
    js.futures[0].set_exception(APIError(code=503, description="no space"))
    js.futures[1].set_result(object())
    await asyncio.sleep(0)
    assert not await publisher.send(messages(3))
    assert len(js.sent) == 2
    failures = await publisher.drain()
    assert sorted(failures) == [0, 2, 3, 4] and publisher.confirmed == 0


async def test_publish_confirmed_against_the_real_stream(stack: Any) -> None:
    """The real server stores and confirms every message once; a re-send is deduplicated."""
    nc = await stack.nats("operator")
    js = nc.jetstream()
    pipeline = f"pub-{uuid.uuid4().hex[:8]}"
    uid = uuid.uuid4().hex
    await jetstream.ensure_job_stream(
        js, jetstream.JobStreamSettings(uid=uid, namespace="t", name="t", pipeline=pipeline)
    )
    try:
        subject = protocol.task_subject(pipeline, uid)
        batch = [Outgoing(subject, b'{"n":%d}' % i, protocol.task_msg_id(uid, str(i))) for i in range(5000)]
        assert await publish_confirmed(js, batch, timeout=10.0, window=512) == {}
        assert await publish_confirmed(js, batch[:100], timeout=10.0) == {}  # deduplicated
        info = await js.stream_info(protocol.task_stream(pipeline))
        assert info.state.messages == 5000
        missing = [Outgoing("mljob.nostream.x", b"{}", "x:1")]
        failures = await publish_confirmed(js, missing, timeout=2.0)
        assert list(failures) == [0], "no stream listens: a failure, not a hang"
    finally:
        await js.delete_stream(protocol.task_stream(pipeline))
        await nc.close()
