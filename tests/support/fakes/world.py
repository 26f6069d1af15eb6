"""One consistent fake world: `Services` built from the fakes, plus simulated workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from mljob import ledger, protocol
from mljob.adapters.services import Services
from mljob.settings import OperatorSettings
from support.fakes.clock import Clock
from support.fakes.kube import FakeKube
from support.fakes.nats import FakeJetStream, FakeKeyValue
from support.fakes.stores import FakeJobsStore, FakeJobState, FakeResultsStore


@dataclass
class Pulled:
    """A task a simulated worker holds: the stream it came from and its sequence there."""

    stream: str
    seq: int
    task: protocol.Task


class FakeWorld:
    """All fakes together, the `Services` over them, and simulated workers."""

    def __init__(self, clock: Clock, settings: OperatorSettings) -> None:
        self.clock = clock
        self.kube = FakeKube()
        self.jobs = FakeJobsStore()
        self.results = FakeResultsStore()
        self.state = FakeJobState()
        self.js = FakeJetStream(clock)
        self.registry = FakeKeyValue()
        self.js.buckets[protocol.REGISTRY_BUCKET] = self.registry
        unused = cast(Any, None)  # the loop never touches raw connections
        self.services = Services(
            settings=settings,
            nc=unused,
            js=cast(Any, self.js),
            registry=cast(Any, self.registry),
            redis=unused,
            state=cast(Any, self.state),
            pool=unused,
            jobs=cast(Any, self.jobs),
            results=cast(Any, self.results),
            kube=cast(Any, self.kube),
        )

    def pull(self, uid: str, count: int) -> list[Pulled]:
        """A worker takes up to `count` undelivered tasks of the job (and may never answer), from
        the consumer the registry names (as workers rebind), else the first generation's."""
        consumer = protocol.task_consumer(uid)
        for key, value in self.registry.entries.items():
            if key.endswith(f".{uid}"):
                consumer = protocol.RegistryEntry.model_validate_json(value).consumer
        stream = next((name for name, s in self.js.streams.items() if consumer in s.consumers), None)
        if stream is None:
            return []
        messages = self.js.fetch(stream, consumer, count)
        return [Pulled(stream, m.seq, protocol.decode_task(m.data)) for m in messages]

    async def answer(self, pulled: Sequence[Pulled], failed: frozenset[str] = frozenset()) -> None:
        """What the collector does with workers' results: the real `ledger.record`, then the ack."""
        results = [
            protocol.Result(
                job_uid=p.task.job.uid,
                item_id=p.task.item_id,
                outcome=protocol.Outcome.FAILED if p.task.item_id in failed else protocol.Outcome.SUCCEEDED,
                error="worker error" if p.task.item_id in failed else None,
                worker="fake-worker",
            )
            for p in pulled
        ]
        await ledger.record(cast(Any, self.results), cast(Any, self.state), results)
        for p in pulled:
            self.js.ack(p.stream, p.seq)

    async def work(self, uid: str, count: int, failed: frozenset[str] = frozenset()) -> list[str]:
        """Pull and answer up to `count` tasks; returns the item ids processed."""
        pulled = self.pull(uid, count)
        await self.answer(pulled, failed)
        return [p.task.item_id for p in pulled]
