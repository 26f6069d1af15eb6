"""Confirmed JetStream publishing of many messages: a window of outstanding PubAcks, every wait bounded.

The one publish helper of the data path: the operator's dispatch and re-dispatch publish tasks
with it, workers publish a batch of results with it. Why this shape:

* Throughput. One awaited `js.publish` per message costs a round trip each. Here up to `window`
  messages are in flight, each with its own reply inbox (nats-py's `publish_async`), and the
  caller learns which of them the stream stored. A message counts as published only once its
  PubAck arrived: nothing is ever taken as durable on the strength of a send alone.
* No wait without a bound. A PubAck can be lost (the server restarted, the connection dropped
  and came back): nats-py's future for it would then wait forever and keep a slot of its window.
  Here a full window waits at most `timeout` for a slot, the last message's ack at most
  `timeout`, and whatever is left then is cancelled (which frees its slot) and reported as
  failed. The caller decides what a failure means (dispatch resumes at its cursor, a worker
  retries or NAKs); deduplication by `Nats-Msg-Id` makes a re-publish harmless.
* No per-message timer. nats-py's own bound (`wait_stall`) runs an `asyncio.wait_for` for every
  message, a task and a timer each; the window here is counted with done-callbacks and waited
  for only when it is full, so the bound costs nothing while acks keep up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mljob import protocol

#: Outstanding PubAcks per call. Must stay below the JetStream context's own limit
#: (`publish_async_max_pending`, 4,000 by default in nats-py), so its semaphore never blocks.
DEFAULT_WINDOW = 2048
#: Messages sent between two turns given to the event loop's other tasks.
YIELD_EVERY = 256


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to store: its subject, body and deduplication id (`Nats-Msg-Id`)."""

    subject: str
    body: bytes
    msg_id: str


class PubAckTimeout(TimeoutError):
    """The stream did not confirm a message within the bound (lost ack, server away)."""


class _Window:
    """Counts outstanding acks; lets the publisher wait (bounded) for a free slot."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.outstanding = 0
        self._room = asyncio.Event()
        self._room.set()

    def taken(self) -> None:
        self.outstanding += 1
        if self.outstanding >= self.size:
            self._room.clear()

    def released(self) -> None:
        self.outstanding -= 1
        if self.outstanding <= self.size // 2:
            self._room.set()

    async def wait_for_room(self, timeout: float) -> bool:
        if self._room.is_set():
            return True
        try:
            await asyncio.wait_for(self._room.wait(), timeout)
        except TimeoutError:
            return False
        return True


class ConfirmedPublisher:
    """Publishes messages in order with a bounded window of outstanding PubAcks.

    `confirmed` is the length of the longest prefix of everything sent whose every message the
    stream confirmed, kept up to date as acks arrive: a dispatcher's cursor may move to it at
    any time. `send` may be called many times (a chunk each) so the window spans chunks and the
    stream never waits for the publisher between them; `drain` waits (bounded) for the rest.
    """

    def __init__(self, js: Any, *, timeout: float, window: int = DEFAULT_WINDOW) -> None:
        self._js = js
        self.timeout = timeout
        self._room = _Window(window)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._ok = bytearray()  # per message: 1 once its PubAck arrived
        self.sent = 0
        self.confirmed = 0
        self.failures: dict[int, BaseException] = {}

    async def send(self, messages: Sequence[Outgoing]) -> bool:
        """Publish `messages` after those sent before; False once anything failed (the rest of
        `messages` is then reported failed and not sent: the caller drains and resumes)."""
        for offset, message in enumerate(messages):
            if self.failures:
                self._fail_rest(messages, offset, self.failures[min(self.failures)])
                return False
            if not await self._room.wait_for_room(self.timeout):
                stalled = PubAckTimeout(f"{self._room.outstanding} PubAcks outstanding for {self.timeout:g}s")
                self._fail_rest(messages, offset, stalled)
                return False
            try:
                future = await self._js.publish_async(
                    message.subject, message.body, headers={protocol.MSG_ID_HEADER: message.msg_id}
                )
            except asyncio.CancelledError:
                self.cancel()
                raise
            except Exception as err:
                self._fail_rest(messages, offset, err)
                return False
            self._track(future)
            if self.sent % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the process's other work run (the collector, acks)
        return not self.failures

    def _track(self, future: asyncio.Future[Any]) -> None:
        index = self.sent
        self.sent += 1
        self._ok.append(0)
        self._futures[index] = future
        self._room.taken()
        future.add_done_callback(lambda f: self._done(index, f))

    def _done(self, index: int, future: asyncio.Future[Any]) -> None:
        self._room.released()
        del self._futures[index]
        if future.cancelled():
            self.failures[index] = PubAckTimeout(f"no PubAck within {self.timeout:g}s")
            return
        error = future.exception()
        if error is not None:
            self.failures[index] = error
            return
        self._ok[index] = 1
        while self.confirmed < self.sent and self._ok[self.confirmed]:
            self.confirmed += 1

    def _fail_rest(self, messages: Sequence[Outgoing], offset: int, error: BaseException) -> None:
        for _ in range(offset, len(messages)):
            self.failures[self.sent] = error
            self._ok.append(0)
            self.sent += 1

    async def drain(self) -> dict[int, BaseException]:
        """Wait at most `timeout` for the acks still out, cancel the rest; the failures by index
        (empty: the stream confirmed every message sent)."""
        waiting = list(self._futures.values())
        if waiting:
            try:
                await asyncio.wait(waiting, timeout=self.timeout)
            except asyncio.CancelledError:
                self.cancel()
                raise
        self.cancel()
        await asyncio.sleep(0)  # let the cancelled futures' callbacks record them
        return self.failures

    def cancel(self) -> None:
        """Stop waiting for every ack still out (each frees its slot of nats-py's window)."""
        for future in list(self._futures.values()):
            future.cancel()


async def publish_confirmed(
    js: Any,
    messages: Sequence[Outgoing],
    *,
    timeout: float,
    window: int = DEFAULT_WINDOW,
) -> dict[int, BaseException]:
    """Publish `messages` in order and wait for their PubAcks; returns the failures by index.

    An empty result means the stream confirmed every message. Each failure is the server's
    refusal (a nats `APIError`), the client's error (disconnected, buffer full) or a
    `PubAckTimeout`. After the first failure the remaining messages are not sent and are
    reported with that failure: the caller's retry sends them again anyway.
    """
    publisher = ConfirmedPublisher(js, timeout=timeout, window=window)
    await publisher.send(messages)
    return await publisher.drain()


__all__ = [
    "DEFAULT_WINDOW",
    "ConfirmedPublisher",
    "Outgoing",
    "PubAckTimeout",
    "publish_confirmed",
]
