"""When each MLJob is next looked at: a heap of due times, pure, the clock passed in.

The Kubernetes Job controller keeps no task per Job: one queue of keys, re-queued with a delay
(`AddAfter`) or at once when something about the Job changed. `DueQueue` is that queue's
ordering: every key has at most one due time; `schedule` sets it (the loop's own pacing, a
deadline, a TTL), `wake` brings it forward to now (a result, an advisory, a watch event) and never
pushes it back. Superseded heap entries are skipped when they surface (lazy deletion), so each
operation is O(log n) and memory is bounded by a small multiple of the keys.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Rebuild the heap when it holds this many times more entries than keys (stale ones pile up
#: when a busy job is woken over and over).
COMPACT_FACTOR = 4


class DueQueue(Generic[K]):
    """Keys ordered by due time; the earliest first, ties in the order they were scheduled."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __iter__(self) -> Iterator[K]:
        return iter(self._due)

    def due_at(self, key: K) -> float | None:
        return self._due.get(key)

    def schedule(self, key: K, at: float) -> None:
        """Due at `at`, whatever it was due at before (the loop's own next look)."""
        if self._due.get(key) == at:
            return
        self._due[key] = at
        heapq.heappush(self._heap, (at, next(self._order), key))
        if len(self._heap) > COMPACT_FACTOR * max(len(self._due), 16):
            self._compact()

    def wake(self, key: K, now: float) -> None:
        """Due now, unless it is due sooner already: a wake-up never delays a job."""
        due = self._due.get(key)
        if due is None or due > now:
            self.schedule(key, now)

    def remove(self, key: K) -> None:
        self._due.pop(key, None)

    def next_due(self) -> float | None:
        """The earliest due time; None when no key is scheduled."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int) -> list[K]:
        """Up to `limit` keys due at `now` or earlier, earliest first; they leave the queue."""
        popped: list[K] = []
        while len(popped) < limit:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._due[key]
            popped.append(key)
        return popped

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [(at, next(self._order), key) for key, at in self._due.items()]
        heapq.heapify(self._heap)
