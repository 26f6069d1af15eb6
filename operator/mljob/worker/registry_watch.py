"""Following the job registry: which jobs of a pipeline are active right now.

The operator puts a RegistryEntry under `<pipeline>.<uid>` in the `mljob-registry` bucket when a
job's tasks are ready, and purges the key when the job is over. A worker watches `<pipeline>.>`;
a delete or purge marker means the job is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from mljob import protocol
from mljob.worker.outcome import describe

log = logging.getLogger(__name__)

REMOVAL_OPERATIONS = frozenset({"DEL", "PURGE"})

OnAdded = Callable[[protocol.RegistryEntry], Awaitable[None]]
OnRemoved = Callable[[str], Awaitable[None]]
ActiveUids = Callable[[], set[str]]


async def open_registry(js: JetStreamContext, retry_seconds: float = 2.0) -> KeyValue:
    """The registry bucket; waits (logging once) until the operator has created it."""
    warned = False
    while True:
        try:
            return await js.key_value(protocol.REGISTRY_BUCKET)
        except BucketNotFoundError:
            if not warned:
                log.warning(
                    "registry bucket %s not found yet; waiting for the operator", protocol.REGISTRY_BUCKET
                )
                warned = True
        except Exception as err:
            if not warned:
                log.warning(
                    "cannot open registry bucket %s: %s; retrying", protocol.REGISTRY_BUCKET, describe(err)
                )
                warned = True
        await asyncio.sleep(retry_seconds)


def uid_from_key(pipeline: str, key: str) -> str | None:
    prefix = f"{pipeline}."
    if not key.startswith(prefix) or len(key) == len(prefix) or "." in key[len(prefix) :]:
        return None
    return key[len(prefix) :]


class RegistryWatcher:
    """Feeds job additions and removals of one pipeline to callbacks, re-watching after errors."""

    def __init__(
        self,
        js: JetStreamContext,
        pipeline: str,
        on_added: OnAdded,
        on_removed: OnRemoved,
        active_uids: ActiveUids,
    ) -> None:
        self._js = js
        self.pipeline = pipeline
        self._on_added = on_added
        self._on_removed = on_removed
        self._active_uids = active_uids

    async def run(self) -> None:
        """Watch until cancelled."""
        kv = await open_registry(self._js)
        backoff = 1.0
        while True:
            try:
                await self._watch_once(kv)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("registry watch failed, re-watching in %.0fs: %s", backoff, describe(err))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _watch_once(self, kv: KeyValue) -> None:
        watcher = await kv.watch(f"{self.pipeline}.>")
        seen: set[str] | None = set()  # keys of the initial snapshot; None once it is complete
        try:
            async for update in watcher:
                if update is None:  # end of the initial snapshot
                    if seen is not None:
                        for gone in self._active_uids() - seen:
                            await self._on_removed(gone)
                    seen = None
                    continue
                key_uid = uid_from_key(self.pipeline, str(update.key))
                if key_uid is None:
                    log.warning("ignoring registry key %r: not <pipeline>.<uid>", update.key)
                    continue
                uid: str = key_uid
                if update.operation in REMOVAL_OPERATIONS:
                    await self._on_removed(uid)
                    continue
                try:
                    entry = protocol.RegistryEntry.model_validate_json(update.value or b"")
                except ValidationError as err:
                    log.warning(
                        "ignoring malformed registry entry %r: %s", update.key, err.errors()[0]["msg"]
                    )
                    continue
                if entry.uid != uid:
                    log.warning("ignoring registry entry %r: it names job %s", update.key, entry.uid)
                    continue
                if seen is not None:
                    seen.add(uid)
                await self._on_added(entry)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception as err:
                log.debug("stopping the registry watcher: %s", err)
        raise ConnectionError("registry watch ended")
