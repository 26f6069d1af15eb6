"""Fakes of JetStream work-queue streams and consumers, and of the registry KV bucket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.errors import NoRespondersError
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    PubAck,
    SequenceInfo,
    StreamConfig,
    StreamInfo,
    StreamState,
)
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError, ServerError
from nats.js.kv import KeyValue

from mljob import protocol
from support.fakes.clock import Clock


@dataclass
class FakeMessage:
    seq: int
    subject: str
    data: bytes


@dataclass
class _Consumer:
    config: ConsumerConfig
    created: datetime
    deliveries: dict[int, int] = field(default_factory=dict)  # seq -> times delivered
    last_active: float | None = None


@dataclass
class _Stream:
    config: StreamConfig
    created: datetime
    messages: dict[int, FakeMessage] = field(default_factory=dict)
    last_seq: int = 0
    msg_ids: set[str] = field(default_factory=set)  # the duplicate window, never expiring here
    consumers: dict[str, _Consumer] = field(default_factory=dict)


def subject_matches(pattern: str, subject: str) -> bool:
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _for(consumer: _Consumer, message: FakeMessage) -> bool:
    """Whether the consumer's filter subject selects the message."""
    return subject_matches(consumer.config.filter_subject or ">", message.subject)


def _not_found(what: str) -> NotFoundError:
    return NotFoundError(code=404, description=f"{what} not found", err_code=10059)


class FakeJetStream:
    """The `JetStreamContext` calls the operator makes, over work-queue streams kept in dicts.

    Workers are simulated with `fetch` (a delivery, counted by the consumer) and `ack` (the
    message leaves the work-queue stream).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.buckets: dict[str, FakeKeyValue] = {}
        self.streams: dict[str, _Stream] = {}
        self.publishes = 0
        #: Called with the number of publish calls so far, before one is served: a test's way to
        #: break NATS at a chosen moment (raise, or delete the stream).
        self.before_publish: Callable[[int], None] | None = None
        #: Consumers whose one server is down (an R1 consumer on a lost node): asking about or
        #: deleting them times out, and creating one records the assignment, then times out.
        self.unanswering: set[str] = set()
        #: Consumers whose server NATS knows to be down (stopped cleanly): requests about them
        #: are answered at once with JetStream's "consumer is offline".
        self.offline: set[str] = set()

    async def key_value(self, bucket: str) -> FakeKeyValue:
        return self.buckets[bucket]

    def _stream(self, name: str) -> _Stream:
        stream = self.streams.get(name)
        if stream is None:
            raise _not_found(f"stream {name}")
        return stream

    def _info(self, stream: _Stream) -> StreamInfo:
        seqs = sorted(stream.messages)
        state = StreamState(
            messages=len(seqs),
            bytes=sum(len(m.data) for m in stream.messages.values()),
            first_seq=seqs[0] if seqs else stream.last_seq + 1,
            last_seq=stream.last_seq,
            consumer_count=len(stream.consumers),
        )
        return StreamInfo(config=stream.config, state=state, created=stream.created)

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> StreamInfo:
        return self._info(self._stream(name))

    async def add_stream(self, config: StreamConfig | None = None, **params: Any) -> StreamInfo:
        assert config is not None and config.name
        stream = self.streams.get(config.name)
        if stream is None:
            stream = self.streams[config.name] = _Stream(config, datetime.now(UTC))
        return self._info(stream)

    async def delete_stream(self, name: str) -> bool:
        self._stream(name)
        del self.streams[name]
        return True

    async def purge_stream(self, name: str, seq: int | None = None, subject: str | None = None) -> bool:
        found = self._stream(name)
        for seq_, message in list(found.messages.items()):
            if subject is None or subject_matches(subject, message.subject):
                del found.messages[seq_]
        return True

    async def add_consumer(
        self, stream: str, config: ConsumerConfig | None = None, timeout: float | None = None, **params: Any
    ) -> ConsumerInfo:
        assert config is not None and config.durable_name
        found = self._stream(stream)
        consumer = found.consumers.get(config.durable_name)
        if consumer is None:
            consumer = found.consumers[config.durable_name] = _Consumer(config, datetime.now(UTC))
        else:
            consumer.config = config
        self._answer(config.durable_name)
        return self._consumer_info(stream, config.durable_name)

    def _answer(self, consumer: str) -> None:
        if consumer in self.unanswering:
            raise nats.errors.TimeoutError()
        if consumer in self.offline:
            raise ServerError(code=500, err_code=10119, description="consumer is offline")

    async def delete_consumer(self, stream: str, consumer: str) -> bool:
        found = self._stream(stream)
        self._answer(consumer)
        if found.consumers.pop(consumer, None) is None:
            raise _not_found(f"consumer {consumer}")
        return True

    def _consumer_info(self, stream: str, name: str) -> ConsumerInfo:
        found = self._stream(stream)
        consumer = found.consumers.get(name)
        if consumer is None:
            raise NotFoundError(code=404, description=f"consumer {name} not found", err_code=10014)
        live = [seq for seq, m in found.messages.items() if seq in consumer.deliveries and _for(consumer, m)]
        last = consumer.last_active
        return ConsumerInfo(
            name=name,
            stream_name=stream,
            config=consumer.config,
            created=consumer.created,
            delivered=SequenceInfo(
                consumer_seq=sum(consumer.deliveries.values()),
                stream_seq=max(consumer.deliveries, default=0),
                last_active=datetime.fromtimestamp(last, UTC) if last is not None else None,
            ),
            num_ack_pending=len(live),
            num_redelivered=sum(1 for seq in live if consumer.deliveries[seq] > 1),
            num_pending=sum(
                1 for seq, m in found.messages.items() if seq not in consumer.deliveries and _for(consumer, m)
            ),
            num_waiting=0,
        )

    async def consumer_info(self, stream: str, consumer: str, timeout: float | None = None) -> ConsumerInfo:
        self._answer(consumer)
        return self._consumer_info(stream, consumer)

    async def publish_async(
        self,
        subject: str,
        payload: bytes = b"",
        wait_stall: float | None = None,
        stream: str | None = None,
        headers: dict[str, str] | None = None,
        msg_ttl: float | None = None,
    ) -> asyncio.Future[PubAck]:
        self.publishes += 1
        if self.before_publish is not None:
            self.before_publish(self.publishes)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        target = next(
            (
                s
                for s in self.streams.values()
                if any(subject_matches(p, subject) for p in s.config.subjects or [])
            ),
            None,
        )
        if target is None:
            future.set_exception(NoRespondersError())
            return future
        msg_id = (headers or {}).get(protocol.MSG_ID_HEADER)
        name = str(target.config.name)
        if msg_id is not None and msg_id in target.msg_ids:
            future.set_result(PubAck(stream=name, seq=target.last_seq, duplicate=True))
            return future
        if msg_id is not None:
            target.msg_ids.add(msg_id)
        target.last_seq += 1
        target.messages[target.last_seq] = FakeMessage(target.last_seq, subject, payload)
        future.set_result(PubAck(stream=name, seq=target.last_seq))
        return future

    # -- test-side helpers (a worker's view) --

    def fetch(self, stream: str, consumer: str, batch: int) -> list[FakeMessage]:
        """Deliver up to `batch` messages never delivered before, oldest first."""
        found = self._stream(stream)
        state = found.consumers[consumer]
        if consumer in self.unanswering or consumer in self.offline:
            return []
        fresh = [
            m for seq, m in sorted(found.messages.items()) if seq not in state.deliveries and _for(state, m)
        ][:batch]
        for message in fresh:
            state.deliveries[message.seq] = 1
        if fresh:
            state.last_active = self.clock.time()
        return fresh

    def ack(self, stream: str, seq: int) -> None:
        found = self.streams.get(stream)
        if found is not None:
            found.messages.pop(seq, None)

    def task_ids(self, stream: str, subject: str = ">") -> list[str]:
        """The item ids of the tasks a stream holds on `subject` (delivered or not)."""
        found = self.streams.get(stream)
        if found is None:
            return []
        return [
            protocol.decode_task(m.data).item_id
            for _, m in sorted(found.messages.items())
            if subject_matches(subject, m.subject)
        ]


class FakeKeyValue:
    """The job registry bucket: put, get, purge, keys."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.revision = 0

    async def put(self, key: str, value: bytes, validate_keys: bool = True) -> int:
        self.revision += 1
        self.entries[key] = value
        return self.revision

    async def get(self, key: str, revision: int | None = None, validate_keys: bool = True) -> KeyValue.Entry:
        if key not in self.entries:
            raise KeyNotFoundError()
        return KeyValue.Entry("mljob-registry", key, self.entries[key], self.revision, None, None, None)

    async def purge(self, key: str, msg_ttl: float | None = None) -> bool:
        self.entries.pop(key, None)
        return True

    async def delete(self, key: str, last: int | None = None, validate_keys: bool = True) -> bool:
        self.entries.pop(key, None)
        return True

    async def keys(self, filters: list[str] | None = None, **kwargs: Any) -> list[str]:
        if not self.entries:
            raise NoKeysError()
        return sorted(self.entries)
