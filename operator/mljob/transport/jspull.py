"""Pulling batches from a durable JetStream consumer through one inbox subscription.

Used by workers (a job's tasks) and by the operator's consumers (the collector's results, the
advisories). Why not nats-py's `fetch`: it takes each message of a batch with an
`asyncio.wait_for` of its own, one turn of the event loop per message, so on a busy loop (the
operator dispatching a big job) a batch of 256 results took seconds to arrive. Here a callback
subscription queues what the server delivers, and a fetch takes it all in one turn.

Two kinds of request:

* `no_wait` (a worker): a worker serves every active job of its pipeline in turn, and a
  lingering pull request on an empty job would stall that rotation (or hold capacity) for its
  whole expiry, so the server answers at once with up to `batch` messages or a `404 No
  Messages` status.
* `linger` seconds (a consumer with nothing else to do): the request stays open on the server
  that long; the fetch returns as soon as anything arrived. Messages the open request delivers
  afterwards are kept for the next fetch (and NAKed by `close`).

Each request gets its own reply subject under the puller's inbox, so a late status for an old
request can never end a newer one early.
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
    """Pull requests against one durable consumer, read through one inbox subscription."""

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

    async def fetch(self, batch: int, linger: float | None = None) -> list[Msg]:
        """Up to `batch` messages: those available now (`linger` None), or the first to arrive
        within `linger` seconds. [] when there were none. Raises PullError."""
        async with self._lock:
            if self._closed:
                return []
            msgs = self._take(batch)
            if len(msgs) >= batch or (msgs and linger is not None):
                return msgs
            self._request += 1
            reply = f"{self._inbox}.{self._request}"
            self._statuses.clear()
            request: dict[str, object] = {"batch": batch - len(msgs)}
            if linger is None:
                request["no_wait"] = True
            else:
                request["expires"] = int(linger * 1e9)  # nanoseconds
            await self._nc.publish(self._next_subject, json.dumps(request).encode(), reply=reply)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._reply_timeout + (linger or 0.0)
            while len(msgs) < batch:
                msgs.extend(self._take(batch - len(msgs)))
                if len(msgs) >= batch or (msgs and linger is not None):
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
        """Stop pulling; NAK tasks that arrived but were never handed out. Returns how many.

        A lingering request still open on the server delivers nothing more once the inbox has
        no subscriber (the server drops a waiting request without interest), so what is NAKed
        here goes to the next fetch of any puller at once."""
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
