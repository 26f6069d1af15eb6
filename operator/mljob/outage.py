"""How a consume loop lives through an outage: one log line per outage, exponential backoff.

The collector and the exhausted-deliveries watcher both pull from a durable consumer and write
to Postgres and Redis; when any of them is down they leave messages for redelivery, log the
problem once (and again only when its cause changes), and back off 0.5 s doubling to 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 5.0


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, clipped: fit for a log line or a dead-letter reason."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Outage:
    """The outage state of one loop: what was last logged and the current backoff."""

    def __init__(self, log: logging.Logger, name: str) -> None:
        self.log = log
        self.name = name
        self.backoff = BACKOFF_INITIAL_SECONDS
        self.failing: str | None = None

    def report(self, what: str, err: BaseException) -> None:
        """One log line per outage (and per change of its cause), not one per retry."""
        line = f"{what}: {one_line(err)}"
        if line != self.failing:
            self.log.warning("%s (retrying with backoff)", line)
            self.failing = line
        else:
            self.log.debug("%s", line)

    def recovered(self) -> None:
        if self.failing is not None:
            self.log.info("%s recovered", self.name)
            self.failing = None
        self.backoff = BACKOFF_INITIAL_SECONDS

    async def sleep(self, stop: asyncio.Event) -> None:
        """Wait the current backoff (or until stopped), then double it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_SECONDS)
