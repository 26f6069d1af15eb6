"""The Postgres job row: the arbiter of the terminal verdict.

The terminal transition is a compare-and-set (`UPDATE ... WHERE phase = ANY(finalizable)`),
so of two racing writers exactly one wins; the loser reads and mirrors the winner's phase.
Every other phase change locks the row and moves only as `core.phases` allows. Each change
of phase writes its `mljob_transitions` row in the same transaction.

Every call goes through `results_store.on_writable`, so it is tried again on the new primary
across a Postgres failover. Each is safe to repeat after an attempt that committed unseen: the
insert does nothing for a row that exists, a phase change already made is no move (so no second
transition row), and the terminal compare-and-set fires at most once (a repeat finds the row
terminal and reports it not won, with the row holding the verdict of the first attempt).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from mljob.adapters.results_store import fetch_all, on_writable
from mljob.api.models import TERMINAL_PHASES, Phase
from mljob.core.counts import ItemCounts
from mljob.core.phases import finalizable_from, moves_to


@dataclass(frozen=True)
class JobRow:
    uid: str
    phase: Phase
    reason: str | None
    message: str | None
    total: int
    processed: int
    failed: int
    completion_time: datetime | None

    @property
    def counts(self) -> ItemCounts | None:
        """The counts the row records, or None for a row that never had items."""
        return ItemCounts(self.total, self.total - self.processed, self.failed) if self.total else None


@dataclass(frozen=True)
class FinishOutcome:
    won: bool  # this writer's guard fired
    row: JobRow  # what Postgres holds now: mirror it


_COLUMNS = "uid, phase, reason, message, total, processed, failed, completion_time"


def _row(values: tuple[Any, ...]) -> JobRow:
    uid, phase, reason, message, total, processed, failed, completion = values
    return JobRow(uid, Phase(phase), reason, message, total, processed, failed, completion)


async def _lock_phase(conn: AsyncConnection[Any], uid: str) -> Phase | None:
    """The row's phase, locked until the transaction ends (None: no row): the guards decide on it."""
    cur = await conn.execute("SELECT phase FROM mljob_jobs WHERE uid = %s FOR UPDATE", (uid,))
    found = await cur.fetchone()
    return Phase(found[0]) if found else None


async def _record_transition(
    conn: AsyncConnection[Any],
    uid: str,
    before: Phase | None,
    after: Phase,
    reason: str,
    message: str,
    actor: str,
) -> None:
    """The audit row of one phase change (every change of `mljob_jobs.phase` has one)."""
    await conn.execute(
        "INSERT INTO mljob_transitions (job_uid, from_phase, to_phase, reason, message, actor) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (uid, before.value if before else None, after.value, reason, message, actor),
    )


class JobsStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def ensure(self, uid: str, namespace: str, name: str, pipeline: str, spec: dict[str, Any]) -> None:
        """Create the row (Pending) once; a resumed job keeps its row as it is."""
        await fetch_all(
            self.pool,
            "INSERT INTO mljob_jobs (uid, namespace, name, pipeline, phase, spec, start_time) "
            "VALUES (%s, %s, %s, %s, 'Pending', %s, now()) ON CONFLICT (uid) DO NOTHING RETURNING uid",
            (uid, namespace, name, pipeline, Jsonb(spec)),
        )

    async def get(self, uid: str) -> JobRow | None:
        rows = await fetch_all(self.pool, f"SELECT {_COLUMNS} FROM mljob_jobs WHERE uid = %s", (uid,))
        return _row(rows[0]) if rows else None

    async def progress(self, uid: str, phase: Phase, counts: ItemCounts, dispatched: int, actor: str) -> None:
        """Mirror progress; never touches a terminal row (a late writer cannot regress it).

        The row follows the MLJob's `phase` only where the phase table allows it (a Canceling
        row never goes back to Running), with its transition row, like `set_phase`."""

        async def write(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                current = await _lock_phase(conn, uid)
                if current is None or current in TERMINAL_PHASES:
                    return
                moved = moves_to(current, phase)
                await conn.execute(
                    "UPDATE mljob_jobs SET phase = %s, total = %s, dispatched = %s, processed = %s, "
                    "failed = %s, last_activity_time = COALESCE(to_timestamp(%s), last_activity_time), "
                    "updated_at = now() WHERE uid = %s",
                    (
                        (phase if moved else current).value,
                        counts.total,
                        dispatched,
                        counts.processed,
                        counts.failed,
                        counts.last_activity,
                        uid,
                    ),
                )
                if moved:
                    await _record_transition(conn, uid, current, phase, "", "", actor)

        await on_writable(self.pool, write)

    async def set_phase(
        self,
        uid: str,
        phase: Phase,
        actor: str,
        reason: str = "",
        message: str = "",
        dispatched: int | None = None,
    ) -> None:
        """A non-terminal phase change (Dispatching, Running, Canceling) the phase table allows,
        with its audit row; any other is not recorded. `dispatched` (Running: every task
        published) is recorded with it, so a job that ends before its first progress write still
        shows in Postgres what it dispatched."""
        if phase in TERMINAL_PHASES:
            raise ValueError(f"{phase} is terminal: only finish() writes it")

        async def write(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                current = await _lock_phase(conn, uid)
                if current is None or not moves_to(current, phase):
                    return
                await conn.execute(
                    "UPDATE mljob_jobs SET phase = %s, dispatched = COALESCE(%s, dispatched), "
                    "updated_at = now() WHERE uid = %s",
                    (phase.value, dispatched, uid),
                )
                await _record_transition(conn, uid, current, phase, reason, message, actor)

        await on_writable(self.pool, write)

    async def finish(
        self, uid: str, target: Phase, reason: str, message: str, counts: ItemCounts | None, actor: str
    ) -> FinishOutcome:
        """Compare-and-set to a terminal phase; returns whether we won and what the row holds."""
        allowed = [p.value for p in finalizable_from(target)]
        sets = "phase = %s, reason = %s, message = %s, completion_time = now(), updated_at = now()"
        params: list[Any] = [target.value, reason, message]
        if counts is not None:
            sets += ", total = %s, processed = %s, failed = %s"
            params += [counts.total, counts.processed, counts.failed]

        async def write(conn: AsyncConnection[Any]) -> FinishOutcome | None:
            async with conn.transaction():
                before = await _lock_phase(conn, uid)
                cur = await conn.execute(
                    f"UPDATE mljob_jobs SET {sets} WHERE uid = %s AND phase = ANY(%s) RETURNING {_COLUMNS}",
                    (*params, uid, allowed),
                )
                won = await cur.fetchone()
                if won:
                    await _record_transition(conn, uid, before, target, reason, message, actor)
                    return FinishOutcome(True, _row(won))
                cur = await conn.execute(f"SELECT {_COLUMNS} FROM mljob_jobs WHERE uid = %s", (uid,))
                current = await cur.fetchone()
            return FinishOutcome(False, _row(current)) if current else None

        outcome = await on_writable(self.pool, write)
        if outcome is None:
            raise LookupError(f"job {uid} has no Postgres row")
        return outcome

    async def namespaces(self, uids: Collection[str]) -> dict[str, str]:
        """The namespace of each job row this installation holds (a UID without a row is absent):
        who owns a stream or Redis keys when several installations share NATS."""
        if not uids:
            return {}
        rows = await fetch_all(
            self.pool, "SELECT uid, namespace FROM mljob_jobs WHERE uid = ANY(%s)", (list(uids),)
        )
        return {str(uid): str(namespace) for uid, namespace in rows}
