"""Forming a batch handler's batches: gathering one job's tasks, and running a redelivered task alone.

Gathering: the dispatcher's turns hand one job's fetched tasks to its `BatchAssembler`, which
cuts batches of at most `max_size`; a partial batch goes out `max_wait` seconds after its first
task arrived (or at once when the worker can fetch nothing more), so a batch fills when tasks
keep coming and a lone task never waits longer than `max_wait`.

Running alone (`Quarantine`): a task delivered more than once may be what made its batch fail or
killed the worker that held it (a poison item). Put back into a batch, it would take the
deliveries of its batch-mates with it again, and with a small `maxDeliver` they would be
exhausted for nothing. So a redelivered task is fetched by itself (the worker asks for one task
first and stops there when it is a redelivery: JetStream hands out redeliveries before new
tasks), waits until it is the only task the worker holds, runs in a batch of one, and the worker
fetches nothing while it is held. Its former batch-mates come back the same way, one by one, and
only the poison item uses up its deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable

from nats.aio.msg import Msg

from mljob.worker.slots import Slots
from mljob.worker.taskmsg import delivery_count


def is_redelivery(msg: Msg) -> bool:
    return delivery_count(msg) > 1


class BatchAssembler:
    """One job's fetched tasks, gathered into batches for `emit`."""

    def __init__(self, max_size: int, max_wait: float, emit: Callable[[list[Msg]], None]) -> None:
        self.max_size = max(1, max_size)
        self.max_wait = max(0.0, max_wait)
        self._emit = emit
        self._pending: list[Msg] = []
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, msgs: Iterable[Msg]) -> None:
        """Take fetched tasks; every full batch goes out now, a partial one after `max_wait`."""
        for msg in msgs:
            self._pending.append(msg)
            if len(self._pending) >= self.max_size:
                self.flush()
        if not self._pending:
            return
        if self.max_wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait, self.flush)

    def flush(self) -> None:
        """Send the partial batch now (its wait is over, or no more tasks can come)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            self._emit(batch)

    def take(self) -> list[Msg]:
        """Remove the tasks not yet sent (to NAK them: the job is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        taken, self._pending = self._pending, []
        return taken


class Quarantine:
    """Redelivered tasks held by a batch-handler worker; each runs only when it is all it holds."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self.held = 0
        self._one_at_a_time = asyncio.Lock()

    def admit(self) -> None:
        self.held += 1

    def release(self) -> None:
        """The task is settled (call before its slot is given back, which wakes the waiters)."""
        self.held -= 1

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Wait until the worker holds nothing but redelivered tasks, then run one of them."""
        async with self._one_at_a_time:
            await self._slots.wait_until(lambda: self._slots.used <= self.held)
            yield

    async def wait_empty(self) -> None:
        """Return once no redelivered task is held (the dispatcher fetches again)."""
        await self._slots.wait_until(lambda: self.held <= 0)


__all__ = ["BatchAssembler", "Quarantine", "is_redelivery"]
