"""Leader election: every replica watches, only the one holding the Lease reconciles.

kopf peering paused a standby's watches and daemons, but not a task of our own (the scheduler),
and kopf has no public hook for its pause state; so HA uses a coordination.k8s.io/v1 Lease the
way kube-controller-manager does (client-go's leaderelection; the rules are in
mljob.core.leases). Every replica runs kopf standalone and keeps its index warm, so a standby
that takes over starts reconciling at once.

What the rest of the operator reads: `leading` (an asyncio.Event, set while this replica leads),
`await wait_leading()`, `lost` (set while it does not lead), `term` (counts acquisitions, so work
started in an earlier term can tell it is stale) and `on_change(callback)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from mljob.adapters.kube import LeaseConflict, LeaseObject
from mljob.core import leases
from mljob.core.leases import Action, LeaseRecord, Observed, Timing
from mljob.ops import metrics

log = logging.getLogger(__name__)


class LeaseStore(Protocol):
    """The three Lease calls of the Kube adapter (a test may wrap them, e.g. to hang them)."""

    async def get_lease(self, namespace: str, name: str, timeout: float) -> LeaseObject | None: ...

    async def create_lease(
        self, namespace: str, name: str, record: LeaseRecord, timeout: float
    ) -> LeaseObject: ...

    async def replace_lease(
        self, namespace: str, name: str, record: LeaseRecord, resource_version: str, timeout: float
    ) -> LeaseObject: ...


def _wall() -> datetime:
    return datetime.now(UTC)


class Leadership:
    """Who leads: this replica, or another one. `always()` for a single replica."""

    def __init__(
        self,
        store: LeaseStore | None,
        identity: str,
        name: str = "mljob-operator",
        namespace: str = "default",
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _wall,
    ) -> None:
        self.identity = identity
        self.name = name
        self.namespace = namespace
        self.timing = timing or Timing()
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost.set()
        self.term = 0
        self._store = store
        self._clock = clock
        self._wall = wall
        self._callbacks: list[Callable[[bool], None]] = []
        self._observed: Observed | None = None
        self._current: LeaseObject | None = None  # the Lease as this replica last read or wrote it
        self._renewed_at: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._failing = False

    @classmethod
    def always(cls, identity: str = "single") -> Leadership:
        """A single replica: it leads from the start and never calls the API."""
        leadership = cls(None, identity)
        leadership._set(True, "leader election is off (one replica)")
        return leadership

    @property
    def elected(self) -> bool:
        """Whether this leadership comes from a Lease (False for always())."""
        return self._store is not None

    async def wait_leading(self) -> None:
        await self.leading.wait()

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(leading)` on every change, in the event loop (keep it short)."""
        self._callbacks.append(callback)

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire and renew until `stop` is set, then release the Lease if this replica holds it.

        Cancelled instead (a crash, a test simulating a hung process), it stops leading at once
        and releases nothing: the others take over when the lease expires."""
        if self._store is None:
            await stop.wait()
            return
        try:
            while not stop.is_set():
                await self._try_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.timing.retry_period)
        except BaseException:  # cancelled, or a bug: nobody renews any more, so nobody leads
            self._set(False, "stopped without releasing the lease")
            raise
        await self.release()

    def close(self) -> None:
        """Free the adapter's threads (after run() returned)."""
        close = getattr(self._store, "close", None)
        if close is not None:
            close()

    async def release(self) -> None:
        """Stop leading, and hand the Lease over at once (client-go's ReleaseOnCancel)."""
        if self._store is None or not self.leading.is_set():
            return
        current = self._current
        self._set(False, "stopping", quiet=True)  # the line below says it
        if current is None or current.record.holder != self.identity:
            log.info("stopped leading %s/%s (%s)", self.namespace, self.name, self.identity)
            return
        record = leases.released(current.record, self._wall())
        try:
            await self._store.replace_lease(
                self.namespace, self.name, record, current.resource_version, self.timing.renew_deadline
            )
        except Exception as err:  # another replica wrote it, or the API is down: it expires
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, _why(err))
            return
        log.info("released lease %s/%s (%s)", self.namespace, self.name, self.identity)

    async def _try_once(self) -> None:
        """One read and, unless another replica holds a live lease, one write (a conflict
        re-reads once at once: someone else wrote, and its write may make this one moot)."""
        assert self._store is not None
        for _ in range(2):
            sent = self._clock()
            try:
                await asyncio.wait_for(self._read_and_write(sent), self.timing.renew_deadline)
            except LeaseConflict:
                continue
            except Exception as err:  # the API is slow or down: the watchdog steps down in time
                if not self._failing:
                    log.warning(
                        "lease %s/%s: cannot read or write it: %s", self.namespace, self.name, _why(err)
                    )
                self._failing = True
                return
            self._failing = False
            return

    async def _read_and_write(self, sent: float) -> None:
        assert self._store is not None
        timeout = self.timing.renew_deadline
        got = await self._store.get_lease(self.namespace, self.name, timeout)
        now = self._clock()
        if got is not None:
            self._current = got
            self._observed = leases.observe(self._observed, got.record, now)
        action = leases.decide(self._observed if got is not None else None, self.identity, now, self.timing)
        if action is Action.FOLLOW:
            if self.leading.is_set():
                holder = got.record.holder if got else None
                self._set(False, f"lease taken over by {holder}")
            return
        record = leases.to_write(
            action, got.record if got else None, self.identity, self._wall(), self.timing
        )
        if action is Action.CREATE:
            written = await self._store.create_lease(self.namespace, self.name, record, timeout)
        else:
            assert got is not None
            written = await self._store.replace_lease(
                self.namespace, self.name, record, got.resource_version, timeout
            )
        self._current = written
        self._observed = leases.observe(self._observed, written.record, self._clock())
        self._renewed(sent, action)

    def _renewed(self, sent: float, action: Action) -> None:
        """A write of this replica's name landed: lead until the renew deadline after `sent`."""
        if not leases.still_leading(sent, self._clock(), self.timing):
            return  # the answer came too late to count on it
        self._renewed_at = sent
        if self._watchdog is not None:
            self._watchdog.cancel()
        delay = leases.step_down_at(sent, self.timing) - self._clock()
        self._watchdog = asyncio.get_running_loop().call_later(max(0.0, delay), self._deadline_passed)
        if not self.leading.is_set():
            self.term += 1
            verb = {Action.CREATE: "created", Action.TAKE_OVER: "took over"}.get(action, "holds")
            self._set(True, f"{verb} lease (term {self.term})")

    def _deadline_passed(self) -> None:
        self._watchdog = None
        if self.leading.is_set() and not leases.still_leading(self._renewed_at, self._clock(), self.timing):
            self._set(False, f"could not renew within {self.timing.renew_deadline:g} s")

    def _set(self, leading: bool, why: str, quiet: bool = False) -> None:
        if leading == self.leading.is_set():
            return
        if leading:
            self.leading.set()
            self.lost.clear()
            log.info("leading: %s %s/%s as %s", why, self.namespace, self.name, self.identity)
        else:
            self.leading.clear()
            self.lost.set()
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            if not quiet:
                log.warning("not leading any more: %s (%s/%s)", why, self.namespace, self.name)
        metrics.LEADER.set(1 if leading else 0)
        for callback in self._callbacks:
            callback(leading)


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    reason = getattr(err, "reason", None)
    status = getattr(err, "status", None)
    if status is not None:
        return f"{status} {reason}"
    return f"{type(err).__name__}: {err}"
