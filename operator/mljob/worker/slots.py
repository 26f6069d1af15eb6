"""Bounded concurrency: a counting semaphore that can also say how many slots are free."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


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

    def take(self, count: int = 1) -> None:
        if self.used + count > self.capacity:
            raise RuntimeError("no free slot")
        self.used += count

    def release(self, count: int = 1) -> None:
        if self.used < count:
            raise RuntimeError("release without take")
        self.used -= count
        self._released.set()

    async def wait_free(self) -> None:
        """Return once at least one slot is free."""
        await self.wait_until(lambda: self.free > 0)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, checked again each time slots are given back."""
        while not condition():
            self._released.clear()
            await self._released.wait()
