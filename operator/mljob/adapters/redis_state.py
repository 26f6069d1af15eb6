"""Per-job item state in Redis: the authoritative "what is still pending" record.

Layout (all keys of one job share the hash tag ``{<uid>}``, so a Redis Cluster keeps them on one
slot and the Lua scripts below may touch them together):

* ``<prefix>:{<uid>}:pending``  SET of item ids not finished yet
* ``<prefix>:{<uid>}:failed``   SET of item ids that finished failed
* ``<prefix>:{<uid>}:total``    number of items; present only once the state is complete
* ``<prefix>:{<uid>}:activity`` unix seconds (float) of the last newly recorded result

Why this shape:

* ``total`` appears last, atomically with ``pending`` (failure-modes row 9): ``initialize`` fills a
  private staging set and a script renames it into place and sets ``total`` in one step, so no
  reader ever sees a half-registered job as "complete", and an interrupted attempt leaves nothing
  visible (its staging set expires on its own).
* Recording is one Lua script per item, so "remove from pending, add to failed, bump activity" is
  atomic and a replayed result is recognised as a duplicate (row 1).
* A result for a job without state never creates keys (row 10): recreating a cleaned-up job's
  keys would leak them and could make a finished job look unfinished.

Works with clients built with ``decode_responses`` on or off.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    MaxConnectionsError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
)

from mljob.core.counts import ItemCounts
from mljob.transport.natsconn import cause

__all__ = ["Client", "JobKeys", "JobState", "RecordOutcome", "RecordStatus", "StoredJob", "connect"]

#: What `connect` returns: a single-node client, or a Redis Cluster client (MLJOB_REDIS_CLUSTER).
Client: TypeAlias = Redis | RedisCluster

#: A staging set of an interrupted ``initialize`` disappears by itself after this long.
STAGING_TTL_SECONDS = 3600
#: Items per pipeline round trip in ``record``/``mark_failed``.
RECORD_PIPELINE_SIZE = 1000
#: Jobs read per round trip by `counts_many`.
COUNTS_PIPELINE_SIZE = 256
#: SADD commands (of ``chunk`` ids each) sent per pipeline round trip in ``initialize``.
CHUNKS_PER_ROUND_TRIP = 10

#: How long a call waits for a free connection of the pool before it fails.
POOL_WAIT_SECONDS = 20.0
#: Cluster mode: how often redis-py itself retries a call that met a connection error, a timeout,
#: CLUSTERDOWN or an uncovered slot (refreshing its slot map first). Kept small: each retry of a
#: timeout costs another socket timeout, and the callers retry on their own (the collector leaves
#: the batch for redelivery, a job loop ticks again); the call after the replica's promotion
#: finds the new map.
CLUSTER_RETRIES = 3


def connect(url: str, max_connections: int, cluster: bool = False, **options: Any) -> Client:
    """The one way a process opens Redis: at most `max_connections` calls at once, the others
    wait for their turn (up to `POOL_WAIT_SECONDS`, then MaxConnectionsError, a ConnectionError).

    redis-py's default pool raises MaxConnectionsError past 100 calls at once; a thousand job
    loops ticking together, or deleting a thousand MLJobs, got there. Its Redis Cluster client has
    no waiting pool at all (a node's connections are capped and the next call fails at once), so
    the wait is ours and the same in both modes: a call (a command, a script, a pipeline's
    execute) takes one of `max_connections` turns of the client. A call holds at most one
    connection per node, so no node's pool is asked for more than `max_connections` at once.
    With `cluster`, `url` is any one node's address (the client finds the others).
    """
    turns = _Turns(max_connections, POOL_WAIT_SECONDS)
    if cluster:
        client = _BoundedCluster.from_url(
            url,
            # Headroom over the turns: after a slot map refresh a released connection is being
            # replaced (disconnected in the background) while the node counts it as taken.
            max_connections=2 * max_connections,
            retry=Retry(NoBackoff(), CLUSTER_RETRIES),
            **options,
        )
        cast(_BoundedCluster, client)._turns = turns
        return client
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_SECONDS, **options
    )
    single = _BoundedRedis.from_pool(pool)
    cast(_BoundedRedis, single)._turns = turns
    return single


#: Set while a task holds a turn: redis-py's own follow-ups of a call (a pipeline's redirected
#: commands) run inside it and must not wait for a second turn (with every turn taken by such
#: calls, none would ever come).
_holding: ContextVar[bool] = ContextVar("mljob_redis_turn", default=False)


class _Turns:
    """At most `size` calls at once; a call waits `wait` seconds at most for its turn."""

    def __init__(self, size: int, wait: float) -> None:
        self.size = size
        self.wait = wait
        self._free = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _holding.get():
            yield
            return
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait)
        except TimeoutError:
            raise MaxConnectionsError(
                f"no free Redis connection within {self.wait:g}s "
                f"({self.size} in use: MLJOB_REDIS_MAX_CONNECTIONS)"
            ) from None
        token = _holding.set(True)
        try:
            yield
        finally:
            _holding.reset(token)
            self._free.release()


class _BoundedRedis(Redis):
    _turns: _Turns

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        async with self._turns.turn():
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _BoundedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe._turns = self._turns
        return pipe


class _BoundedPipeline(Pipeline):
    _turns: _Turns

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        async with self._turns.turn():
            return await super().execute(raise_on_error)


class _BoundedCluster(RedisCluster):
    _turns: _Turns

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] == "PING" and "target_nodes" not in kwargs:
            # Readiness and start-up: the primaries answer (a lost replica does not stop us).
            kwargs["target_nodes"] = self.PRIMARIES
        async with self._turns.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        pipe = _BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]
        pipe._turns = self._turns
        return pipe


class _BoundedClusterPipeline(ClusterPipeline):
    _turns: _Turns

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self._turns.turn():
            return await super().execute(raise_on_error, allow_redirections)


def refused(where: str) -> Callable[[BaseException], str | None]:
    """Redis refusing the password or the user's rights (a `natsconn.Permanent` for start-up):
    the same URL will be refused again, so the process says what to fix instead of retrying."""

    def check(err: BaseException) -> str | None:
        # The cluster client wraps what the nodes answered its first call: look down the chain.
        seen: BaseException | None = err
        while seen is not None:
            if isinstance(seen, AuthenticationError | AuthorizationError | NoPermissionError):
                return (
                    f"Redis at {where} refused the credentials ({cause(seen)}): "
                    "check the user and password in MLJOB_REDIS_URL"
                )
            if isinstance(seen, RedisClusterException) and "not enabled" in str(seen):
                return f"Redis at {where} is not a Redis Cluster: unset MLJOB_REDIS_CLUSTER"
            seen = seen.__cause__
        return None

    return check


# KEYS: total, pending, failed, activity (one job's). ARGV: now (unix seconds), then per item its
# id and "1" when failed. Returns {-1} when the job has no state, else per item {status,
# pending_left}: status 1 = newly recorded, 0 = duplicate. One call per job and batch, not per
# item: the per-item calls were a tenth of the operator's CPU while collecting.
_RECORD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1}
end
local out = {}
local moved = false
for i = 2, #ARGV, 2 do
  local removed = redis.call('SREM', KEYS[2], ARGV[i])
  if removed == 1 then
    if ARGV[i + 1] == '1' then
      redis.call('SADD', KEYS[3], ARGV[i])
    end
    moved = true
  end
  out[#out + 1] = removed
  out[#out + 1] = redis.call('SCARD', KEYS[2])
end
if moved then
  local last = tonumber(redis.call('GET', KEYS[4]))
  if last == nil or tonumber(ARGV[1]) > last then
    redis.call('SET', KEYS[4], ARGV[1])
  end
end
return out
"""

# KEYS: total, pending, failed, activity, staging. Returns the item count, or -1 when the state
# already existed (another initializer won; its state is kept and the staging set dropped).
_COMMIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[5])
  return -1
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
local n = 0
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[2])
  redis.call('PERSIST', KEYS[2])
  n = redis.call('SCARD', KEYS[2])
end
redis.call('SET', KEYS[1], n)
return n
"""


# KEYS: total, pending, failed, activity, staging pending, staging failed. ARGV: total, now.
# Like _COMMIT_LUA, but for state rebuilt from the results ledger: pending and failed together.
_RESTORE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[5], KEYS[6])
  return -1
end
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[2])
  redis.call('PERSIST', KEYS[2])
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('RENAME', KEYS[6], KEYS[3])
  redis.call('PERSIST', KEYS[3])
end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return redis.call('SCARD', KEYS[2])
"""


# KEYS: total, pending, failed, activity (one job's). Returns nil when the job has no state (no
# ``total``), else {total, SCARD pending, SCARD failed, activity or nil}: one job's counts read
# atomically. One script per job, not one MULTI/EXEC over many jobs: their keys are on many slots
# of a Redis Cluster, and a transaction may touch one slot only.
_COUNTS_LUA = """
local total = redis.call('GET', KEYS[1])
if not total then
  return false
end
return {total, redis.call('SCARD', KEYS[2]), redis.call('SCARD', KEYS[3]), redis.call('GET', KEYS[4])}
"""


@dataclass(frozen=True)
class JobKeys:
    """The Redis keys of one job (one hash slot)."""

    total: str
    pending: str
    failed: str
    activity: str

    def all(self) -> tuple[str, str, str, str]:
        return (self.total, self.pending, self.failed, self.activity)


@dataclass(frozen=True)
class StoredJob:
    """The keys one job has in Redis, as a scan found them (for the orphan sweep).

    ``idle_seconds`` is the smallest ``OBJECT IDLETIME`` of those keys: how long nobody has
    read or written any of them. None when Redis cannot tell (an LFU ``maxmemory-policy``).
    """

    uid: str
    keys: tuple[str, ...]
    idle_seconds: float | None


class RecordStatus(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    NO_STATE = "no-state"


@dataclass(frozen=True)
class RecordOutcome:
    """What recording one result did; ``pending_left`` is None when the job has no state."""

    uid: str
    item_id: str
    status: RecordStatus
    pending_left: int | None


def _counts_of(reply: Any) -> ItemCounts | None:
    """A job's counts from the reply of the counts script: nil, or total, pending, failed, activity."""
    if reply is None:
        return None
    total, pending, failed, activity = reply
    return ItemCounts(
        total=int(_text(total)),
        pending=int(pending),
        failed=int(failed),
        last_activity=float(_text(activity)) if activity is not None else None,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class JobState:
    """Item state of every job, under one key prefix (tests isolate by prefix)."""

    def __init__(self, redis: Client, prefix: str = "mljob") -> None:
        self._redis = redis
        self._prefix = prefix
        self._record = redis.register_script(_RECORD_LUA)
        self._commit = redis.register_script(_COMMIT_LUA)
        self._restore = redis.register_script(_RESTORE_LUA)
        self._read_counts = redis.register_script(_COUNTS_LUA)

    def keys(self, uid: str) -> JobKeys:
        base = f"{self._prefix}:{{{uid}}}"
        return JobKeys(
            total=f"{base}:total",
            pending=f"{base}:pending",
            failed=f"{base}:failed",
            activity=f"{base}:activity",
        )

    async def initialize(self, uid: str, item_ids: Sequence[str], chunk: int = 5000) -> bool:
        """Register the job's items once; False (and nothing touched) if the state already exists.

        The ids go to a staging set private to this attempt, then one script moves it into place and
        writes ``total`` last, so the state appears complete or not at all. ``total`` counts distinct
        ids (a duplicated id is one item: it can only ever be removed from the set once).
        """
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        keys = self.keys(uid)
        if await self._redis.exists(keys.total):
            return False
        staging = f"{self._prefix}:{{{uid}}}:staging:{uuid.uuid4().hex}"
        pending_cmds = 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for part in _chunks(item_ids, chunk):
                pipe.sadd(staging, *part)
                pipe.expire(staging, STAGING_TTL_SECONDS)
                pending_cmds += 1
                if pending_cmds >= CHUNKS_PER_ROUND_TRIP:
                    await pipe.execute()
                    pending_cmds = 0
            if pending_cmds:
                await pipe.execute()
        written = int(await self._commit(keys=[*keys.all(), staging]))
        return written >= 0

    async def restore(
        self, uid: str, total: int, pending_ids: Sequence[str], failed_ids: Sequence[str], now: float
    ) -> bool:
        """Recreate lost state from the results ledger (failure-modes row 12), all or nothing.

        False (nothing touched) when state exists already. Like ``initialize``, the sets are staged
        privately and ``total`` is written last, so a reader never sees a half-rebuilt job.
        """
        keys = self.keys(uid)
        if await self._redis.exists(keys.total):
            return False
        tag = uuid.uuid4().hex
        staging_pending = f"{self._prefix}:{{{uid}}}:staging:{tag}:pending"
        staging_failed = f"{self._prefix}:{{{uid}}}:staging:{tag}:failed"
        async with self._redis.pipeline(transaction=False) as pipe:
            for staging, ids in ((staging_pending, pending_ids), (staging_failed, failed_ids)):
                for part in _chunks(ids, 5000):
                    pipe.sadd(staging, *part)
                    pipe.expire(staging, STAGING_TTL_SECONDS)
            await pipe.execute()
        written = await self._restore(
            keys=[*keys.all(), staging_pending, staging_failed], args=[total, repr(now)]
        )
        return int(written) >= 0

    async def counts(self, uid: str) -> ItemCounts | None:
        """One consistent read (one script, one round trip); None when the state is missing.

        Missing state is reported as such, never as "complete" (failure-modes row 8).
        """
        return (await self.counts_many([uid]))[uid]

    async def counts_many(self, uids: Sequence[str]) -> dict[str, ItemCounts | None]:
        """`counts` of many jobs, each read atomically by one script, pipelined: one round trip
        per chunk (per node of a Redis Cluster, in parallel): the scheduler reads every job due
        at the same moment at once (a restart, a burst of wake-ups)."""
        found: dict[str, ItemCounts | None] = {}
        for chunk in _chunks(uids, COUNTS_PIPELINE_SIZE):
            replies = await self._eval_many(self._read_counts, [(self.keys(uid).all(), ()) for uid in chunk])
            found.update((uid, _counts_of(reply)) for uid, reply in zip(chunk, replies, strict=True))
        return found

    async def record(self, entries: Sequence[tuple[str, str, bool]], now: float) -> list[RecordOutcome]:
        """Record finished items ``(uid, item_id, failed)``: one script per job, one round trip.

        An item leaves ``pending`` at most once, so a replayed result is a DUPLICATE and is not
        counted again; results for jobs without state are NO_STATE and create no keys.
        """
        outcomes: list[RecordOutcome] = []
        for start in range(0, len(entries), RECORD_PIPELINE_SIZE):
            outcomes.extend(await self._record_batch(entries[start : start + RECORD_PIPELINE_SIZE], now))
        return outcomes

    async def _record_batch(
        self, entries: Sequence[tuple[str, str, bool]], now: float
    ) -> list[RecordOutcome]:
        """One script call per job of the batch (all its items), all pipelined in one round trip."""
        if not entries:
            return []
        by_job: dict[str, list[int]] = {}
        for index, (uid, _, _) in enumerate(entries):
            by_job.setdefault(uid, []).append(index)
        calls = list(by_job.items())
        replies = await self._eval_many(
            self._record,
            [
                (
                    self.keys(uid).all(),
                    (
                        repr(now),
                        *(v for i in indexes for v in (entries[i][1], "1" if entries[i][2] else "0")),
                    ),
                )
                for uid, indexes in calls
            ],
        )
        outcomes: list[RecordOutcome | None] = [None] * len(entries)
        for (uid, indexes), reply in zip(calls, replies, strict=True):
            for n, i in enumerate(indexes):
                item_id = entries[i][1]
                if int(reply[0]) < 0:
                    outcomes[i] = RecordOutcome(uid, item_id, RecordStatus.NO_STATE, None)
                    continue
                code, left = int(reply[2 * n]), int(reply[2 * n + 1])
                status = RecordStatus.NEW if code == 1 else RecordStatus.DUPLICATE
                outcomes[i] = RecordOutcome(uid, item_id, status, left)
        return [o for o in outcomes if o is not None]

    async def _eval_many(
        self, script: AsyncScript, calls: Sequence[tuple[Sequence[str], Sequence[str]]]
    ) -> list[Any]:
        """The replies of `script` run once per ``(keys, args)``, all pipelined (not a
        transaction: each call is atomic by itself, and their keys may be on many slots).

        A Redis Cluster client splits the pipeline per node and sends those in parallel. Calls
        a node answers NoScriptError (a restart, SCRIPT FLUSH, or a replica promoted since: a
        script cache is not replicated) are redone once after loading the script on every
        primary; only those, so no other call runs twice.
        """
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for c in todo:
                    keys, args = calls[c]
                    # (A cluster pipeline refuses its `evalsha` method; the command itself is routed
                    # by its keys.)
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            missing: list[int] = []
            for c, reply in zip(todo, results, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(c)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[c] = reply
            if not missing:
                break
            if attempt == 1:
                raise NoScriptError("a script vanished twice from the Redis script cache")
            await self._redis.script_load(script.script)
            todo = missing
        return replies

    async def mark_failed(self, uid: str, item_ids: Sequence[str], now: float) -> int:
        """Fail still-pending items (e.g. deliveries exhausted); returns how many were newly failed."""
        outcomes = await self.record([(uid, item_id, True) for item_id in item_ids], now)
        return sum(1 for o in outcomes if o.status is RecordStatus.NEW)

    async def delete(self, uid: str) -> None:
        """Remove every key of the job; idempotent. (A staging set of an interrupted
        ``initialize`` is not listed here: it expires by itself.)"""
        await self._redis.delete(*self.keys(uid).all())

    async def pending_ids(self, uid: str) -> set[str]:
        return await self._members(self.keys(uid).pending)

    async def failed_ids(self, uid: str) -> set[str]:
        return await self._members(self.keys(uid).failed)

    async def _members(self, key: str) -> set[str]:
        members = await cast(Awaitable[set[Any]], self._redis.smembers(key))
        return {_text(v) for v in members}

    async def scan_jobs(self, count: int = 1000, idle: bool = True) -> dict[str, StoredJob]:
        """Every job that has keys under this prefix (SCAN, never KEYS), with their idle time
        unless `idle` is False (then ask `measure_idle` for the jobs that need it: with ten
        thousand live jobs, asking every key is most of an idle operator's Redis traffic).

        Staging sets of interrupted ``initialize`` calls are left out: they expire by themselves.
        """
        head = f"{self._prefix}:{{"
        found: dict[str, list[str]] = {}
        async for raw in self._redis.scan_iter(match=f"{head}*}}:*", count=count):
            key = _text(raw)
            uid, sep, rest = key[len(head) :].partition("}:")
            if not sep or not uid or rest.startswith("staging:"):
                continue
            found.setdefault(uid, []).append(key)
        jobs = {
            uid: StoredJob(uid=uid, keys=tuple(sorted(keys)), idle_seconds=None)
            for uid, keys in found.items()
        }
        return await self.measure_idle(jobs) if idle else jobs

    async def measure_idle(self, jobs: Mapping[str, StoredJob]) -> dict[str, StoredJob]:
        """The jobs with their idle time: the smallest ``OBJECT IDLETIME`` of their keys (None
        when Redis cannot tell, e.g. under an LFU eviction policy)."""
        flat = [key for job in jobs.values() for key in job.keys]
        idle_of: dict[str, Any] = {}
        for part in _chunks(flat, RECORD_PIPELINE_SIZE):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in part:
                    pipe.object("idletime", key)
                idle_of.update(zip(part, await pipe.execute(raise_on_error=False), strict=True))
        measured: dict[str, StoredJob] = {}
        for uid, job in jobs.items():
            replies = [idle_of[key] for key in job.keys]
            idle: float | None = None
            if not any(isinstance(r, Exception) for r in replies):
                times = [float(r) for r in replies if r is not None]  # None: deleted since the scan
                idle = min(times) if times else None
            measured[uid] = StoredJob(uid=uid, keys=job.keys, idle_seconds=idle)
        return measured
