"""A clock the tests move forward: real time plus an offset, for deadlines, stalls and TTLs."""

from __future__ import annotations

import time

_real_time = time.time


class Clock:
    """Wall-clock time plus an offset the test moves forward.

    The code under test also stamps times with `datetime.now` (startTime, completionTime), so the
    fake clock stays in step with the real one and only ever runs ahead of it.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return _real_time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
