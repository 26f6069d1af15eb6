"""How a consume loop lives through an outage: one log line per outage, exponential backoff,
and the one fetch loop over a durable pull consumer that the collector and the
exhausted-deliveries watcher share.

The collector and the exhausted-deliveries watcher both pull from a durable consumer and write
to Postgres and Redis; when any of them is down they leave messages for redelivery, log the
problem once (and again only when its cause changes), and back off 0.5 s doubling to 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mljob.transport.jspull import JobPuller

BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 5.0


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, clipped: fit for a log line or a dead-letter reason."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


async def ack(msg: Any, log: logging.Logger) -> None:
    """Fire-and-forget ack (the caller flushes); a lost ack only means an idempotent replay."""
    try:
        await msg.ack()
    except Exception as err:
        log.warning("ack failed (the message will be redelivered): %s", one_line(err))


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

    async def nak(self, msgs: list[Any]) -> None:
        """Ask for redelivery after the current backoff; if NATS is gone too, ack_wait does it."""
        try:
            for msg in msgs:
                await msg.nak(delay=self.backoff)
        except Exception as err:
            self.log.debug("nak failed (redelivery after ack_wait instead): %s", one_line(err))

    async def sleep(self, stop: asyncio.Event) -> None:
        """Wait the current backoff (or until stopped), then double it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_SECONDS)


async def consume(
    nc: Any,
    stream: str,
    consumer: str,
    process: Callable[[list[Any]], Awaitable[bool]],
    outage: Outage,
    stop: asyncio.Event,
    *,
    batch: int,
    fetch_timeout: float = 1.0,
    on_idle: Callable[[], None] | None = None,
    ensure: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Fetch batches from a durable pull consumer and hand them to `process` until `stop`.

    `process` returns False when a dependency failed and it left the batch for redelivery: the
    loop then backs off. Pull failures (consumer missing, connection lost) are outages too.
    Nothing here ever ends the loop but `stop`. Batches come through `jspull.JobPuller` (one
    turn of the event loop per batch, not per message, see there), each request lingering
    `fetch_timeout` seconds on the server while nothing is waiting.
    """

    async def recover() -> None:
        """After an outage: recreate the stream and consumer (NATS may have lost its storage)."""
        if ensure is not None:
            try:
                await ensure()
            except Exception as err:
                outage.report(f"cannot recreate {stream}/{consumer}", err)

    puller: JobPuller | None = None
    try:
        while not stop.is_set():
            if puller is None:
                puller = JobPuller(nc, stream, consumer)
                try:
                    await puller.start()
                except Exception as err:
                    puller = None
                    outage.report(f"cannot subscribe for {stream}/{consumer}", err)
                    await outage.sleep(stop)
                    continue
            try:
                msgs: list[Any] = await puller.fetch(batch, linger=fetch_timeout)
            except Exception as err:
                outage.report(f"fetching from {stream}/{consumer} failed", err)
                await outage.sleep(stop)
                await recover()
                with contextlib.suppress(Exception):
                    await puller.close()
                puller = None  # pull again on a new inbox: the consumer may be a new one
                continue
            if not msgs:  # nothing to do
                if on_idle is not None:
                    on_idle()
                continue
            if await process(msgs):
                outage.recovered()
            else:
                await outage.sleep(stop)
    finally:
        if puller is not None:
            # Deliveries kept for the next fetch go back at once instead of waiting for ack_wait.
            with contextlib.suppress(Exception):
                await puller.close()
