"""Pulling tasks from one job's durable consumer without ever waiting on an empty job.

A worker serves every active job of its pipeline in turn. A lingering pull request on an empty
job would stall that rotation (or hold capacity) for its whole expiry, so each fetch here is a
JetStream `no_wait` pull request: the server answers at once with up to `batch` messages, or
with a `404 No Messages` status. Each request gets its own reply subject under the puller's
inbox, so a late status for an old request can never end a newer one early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

JS_API_PREFIX = "$JS.API"
ACK_PREFIX = "$JS.ACK."
#: Statuses that just mean "nothing (more) right now".
EMPTY_STATUSES = frozenset({"404", "408"})


class PullError(Exception):
    """The server refused the pull request (consumer or stream gone, no JetStream, ...)."""


def is_task_message(msg: Msg) -> bool:
    """A delivered JetStream message (as opposed to a status message for the pull request)."""
    reply: str | None = msg.reply
    return bool(reply) and str(reply).startswith(ACK_PREFIX)


class JobPuller:
    """no_wait pull requests against one durable consumer, read through one inbox subscription."""

    def __init__(self, nc: Client, stream: str, consumer: str, reply_timeout: float = 2.0) -> None:
        self._nc = nc
        self.stream = stream
        self.consumer = consumer
        self._reply_timeout = reply_timeout
        self._next_subject = f"{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Any = None
        self._tasks: deque[Msg] = deque()
        self._statuses: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._request = 0
        self._closed = False

    async def start(self) -> None:
        self._inbox = str(self._nc.new_inbox())
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)

    async def _on_message(self, msg: Msg) -> None:
        if self._closed and is_task_message(msg):
            await _quiet_nak(msg)  # arrived after close: hand it straight back
            return
        (self._tasks if is_task_message(msg) else self._statuses).append(msg)
        self._arrived.set()

    async def fetch(self, batch: int) -> list[Msg]:
        """Up to `batch` tasks available now; [] when the job has none. Raises PullError."""
        async with self._lock:
            if self._closed:
                return []
            msgs = self._take(batch)
            if len(msgs) >= batch:
                return msgs
            self._request += 1
            reply = f"{self._inbox}.{self._request}"
            self._statuses.clear()
            request = {"batch": batch - len(msgs), "no_wait": True}
            await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=reply)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._reply_timeout
            while len(msgs) < batch:
                msgs.extend(self._take(batch - len(msgs)))
                if len(msgs) >= batch:
                    break
                status = self._status_for(reply)
                if status is not None:
                    code = status.headers.get("Status", "") if status.headers else ""
                    if code in EMPTY_STATUSES or msgs:
                        break
                    description = (status.headers or {}).get("Description", "").strip()
                    raise PullError(f"pull from {self.stream}/{self.consumer}: {code} {description}".strip())
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if not msgs:
                        log.debug("pull request to %s/%s got no reply in time", self.stream, self.consumer)
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
            return msgs

    def _take(self, limit: int) -> list[Msg]:
        out: list[Msg] = []
        while self._tasks and len(out) < limit:
            out.append(self._tasks.popleft())
        return out

    def _status_for(self, reply: str) -> Msg | None:
        while self._statuses:
            status = self._statuses.popleft()
            if status.subject == reply:
                return status
        return None

    async def close(self) -> int:
        """Stop pulling; NAK tasks that arrived but were never handed out. Returns how many."""
        async with self._lock:
            self._closed = True
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
            leftovers = list(self._tasks)
            self._tasks.clear()
            for msg in leftovers:
                await _quiet_nak(msg)
            return len(leftovers)


async def _quiet_nak(msg: Msg) -> None:
    try:
        await msg.nak()
    except Exception as err:
        log.debug("NAK failed: %s", err)
