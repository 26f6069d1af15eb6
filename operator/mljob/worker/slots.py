"""Bounded concurrency: a counting semaphore that can also say how many slots are free."""

from __future__ import annotations

import asyncio


class Slots:
    """`capacity` slots; a fetched task takes one and gives it back when it is settled."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.used = 0
        self._released = asyncio.Event()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def take(self) -> None:
        if self.used >= self.capacity:
            raise RuntimeError("no free slot")
        self.used += 1

    def release(self) -> None:
        if self.used <= 0:
            raise RuntimeError("release without take")
        self.used -= 1
        self._released.set()

    async def wait_free(self) -> None:
        """Return once at least one slot is free."""
        while self.free <= 0:
            self._released.clear()
            await self._released.wait()
