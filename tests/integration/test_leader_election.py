"""Leader election against the real kube-apiserver: two Leadership instances on one Lease, with
short durations (3 s lease, 2 s renew deadline, 0.5 s retry). A sampler looks at both every
50 ms for the whole test and fails it if both ever lead at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import config as kube_config

from mljob.adapters.kube import Kube, LeaseObject
from mljob.controller.leader import Leadership
from mljob.core.leases import LeaseRecord, Timing
from support.waiting import eventually

TIMING = Timing(lease_duration=3, renew_deadline=2.0, retry_period=0.5)
#: Scheduling slack on a busy test machine.
SLACK = 0.75


class Freezable:
    """The Kube adapter's Lease calls, which hang forever once frozen: a leader whose process
    (or network) stalls, with nothing released."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.frozen = False
        self._never = asyncio.Event()

    async def _gate(self) -> None:
        if self.frozen:
            await self._never.wait()

    async def get_lease(self, namespace: str, name: str, timeout: float) -> LeaseObject | None:
        await self._gate()
        got = await self.kube.get_lease(namespace, name, timeout)
        await self._gate()
        return got

    async def create_lease(
        self, namespace: str, name: str, record: LeaseRecord, timeout: float
    ) -> LeaseObject:
        await self._gate()
        return await self.kube.create_lease(namespace, name, record, timeout)

    async def replace_lease(
        self, namespace: str, name: str, record: LeaseRecord, resource_version: str, timeout: float
    ) -> LeaseObject:
        await self._gate()
        written = await self.kube.replace_lease(namespace, name, record, resource_version, timeout)
        await self._gate()
        return written


@dataclass
class Replica:
    leadership: Leadership
    store: Freezable
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: (monotonic time, leading) at every change
    changes: list[tuple[float, bool]] = field(default_factory=list)

    def start(self) -> None:
        self.leadership.on_change(lambda leading: self.changes.append((time.monotonic(), leading)))
        self.task = asyncio.create_task(self.leadership.run(self.stop))

    def last(self, leading: bool) -> float:
        return max(t for t, state in self.changes if state is leading)


class Sampler:
    """Both replicas' `leading`, every 50 ms, until stopped; `both` lists the samples where
    both led."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.samples = 0
        self.both: list[float] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if sum(r.leadership.leading.is_set() for r in self.replicas) > 1:
                self.both.append(time.monotonic())
            self.samples += 1
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """The one wait-for helper polled every 20 ms; the monotonic time the condition first held."""
    await eventually(condition, timeout, interval=0.02, what=what)
    return time.monotonic()


@pytest.fixture
async def pair(stack: Any, namespace: str) -> AsyncIterator[tuple[Kube, Replica, Replica]]:
    kube = Kube(kube_config.new_client_from_config(config_file=stack.kubeconfig), threads=4)
    replicas = []
    for identity in ("replica-a", "replica-b"):
        store = Freezable(kube)
        leadership = Leadership(store, identity, name="mljob-operator", namespace=namespace, timing=TIMING)
        replicas.append(Replica(leadership, store))
    sampler = Sampler(replicas)
    for replica in replicas:
        replica.start()
    yield kube, replicas[0], replicas[1]
    for replica in replicas:
        replica.store.frozen = False
        if replica.task is not None:
            replica.task.cancel()
            await asyncio.gather(replica.task, return_exceptions=True)
    await sampler.close()
    kube.close()
    assert sampler.samples > 20
    assert not sampler.both, f"both replicas led at once ({len(sampler.both)} samples)"


async def lease(kube: Kube, namespace: str) -> LeaseRecord:
    got = await kube.get_lease(namespace, "mljob-operator", 5)
    assert got is not None
    return got.record


async def first_leader(a: Replica, b: Replica) -> tuple[Replica, Replica]:
    await until(lambda: a.leadership.leading.is_set() or b.leadership.leading.is_set(), 10, "a leader")
    return (a, b) if a.leadership.leading.is_set() else (b, a)


async def test_one_leads_and_a_released_lease_passes_to_the_other_within_a_retry_period(
    pair: tuple[Kube, Replica, Replica], namespace: str
) -> None:
    kube, a, b = pair
    leader, standby = await first_leader(a, b)
    record = await lease(kube, namespace)
    assert record.holder == leader.leadership.identity and record.duration_seconds == 3
    # it keeps leading through many renewals; the standby keeps following
    start = time.monotonic()
    await until(lambda: time.monotonic() > start + 2 * TIMING.lease_duration, 10, "two lease durations")
    assert leader.leadership.leading.is_set() and not standby.leadership.leading.is_set()
    assert (await lease(kube, namespace)).renew_time != record.renew_time  # renewed meanwhile

    leader.stop.set()
    assert leader.task is not None
    await asyncio.wait_for(leader.task, 5)
    released_at = leader.last(False)
    took_over = await until(standby.leadership.leading.is_set, 5, "the standby to take over")
    assert took_over - released_at < TIMING.retry_period + SLACK, "the standby waited for expiry"
    after = await lease(kube, namespace)
    assert after.holder == standby.leadership.identity
    assert after.transitions == record.transitions + 1
    assert standby.leadership.term == 1


async def test_a_hung_leader_steps_down_before_the_lease_expires_and_only_then_is_replaced(
    pair: tuple[Kube, Replica, Replica], namespace: str
) -> None:
    kube, a, b = pair
    leader, standby = await first_leader(a, b)
    leader.store.frozen = True  # every call from now on hangs: no renewal, no release
    frozen_at = time.monotonic()
    # Read the Lease until another holder is in it: the last record holding the hung leader is
    # its last renewal that landed (one in flight at the freeze may still land).
    last = await lease(kube, namespace)
    deadline = time.monotonic() + 10
    while True:
        now = await lease(kube, namespace)
        if now.holder != leader.leadership.identity:
            break
        last = now
        assert time.monotonic() < deadline, "nobody took the lease over"
        await asyncio.sleep(0.05)
    assert last.holder == leader.leadership.identity and last.renew_time is not None
    last_renewal_wall = last.renew_time
    took_over = await until(standby.leadership.leading.is_set, 10, "the standby to take over")
    took_over_wall = datetime.now(UTC)
    stepped_down = leader.last(False)
    assert not leader.leadership.leading.is_set()
    # the hung one stepped down by itself, within the renew deadline of its last renewal ...
    assert stepped_down - frozen_at < TIMING.renew_deadline + SLACK
    # ... before the standby took over, which waited for the lease to expire
    assert stepped_down < took_over
    assert (took_over_wall - last_renewal_wall).total_seconds() >= TIMING.lease_duration
    after = await lease(kube, namespace)
    assert after.holder == standby.leadership.identity
    assert after.transitions == last.transitions + 1


async def test_a_leader_cancelled_without_release_stops_leading_at_once_and_expires(
    pair: tuple[Kube, Replica, Replica], namespace: str
) -> None:
    kube, a, b = pair
    leader, standby = await first_leader(a, b)
    assert leader.task is not None
    leader.task.cancel()
    await asyncio.gather(leader.task, return_exceptions=True)
    assert not leader.leadership.leading.is_set() and leader.leadership.lost.is_set()
    cancelled_at = time.monotonic()
    last = await lease(kube, namespace)
    assert last.holder == leader.leadership.identity  # nothing was released
    took_over = await until(standby.leadership.leading.is_set, 10, "the standby to take over")
    # it waited for the lease to expire: at least a duration after the last renewal, which
    # was at most a retry period before the cancel
    assert took_over - cancelled_at >= TIMING.lease_duration - TIMING.retry_period - 0.1
    assert (await lease(kube, namespace)).holder == standby.leadership.identity


async def test_always_leads_without_the_api() -> None:
    leadership = Leadership.always("solo")
    assert leadership.leading.is_set() and not leadership.elected
    await asyncio.wait_for(leadership.wait_leading(), 1)
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(leadership.run(stop), 1)
