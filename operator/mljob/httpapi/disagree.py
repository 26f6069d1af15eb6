"""Where a job's stores disagree, said in plain language for the people reading a job summary.

Pure: `disagreements` compares what the summary read from each store (the MLJob's status, the
Postgres ledger, Redis, the NATS consumer) and returns one sentence per disagreement, with what
the operator does about it. A store that could not be read is None and is left out of every
comparison. Differences that are normal while a job runs are not reported (the MLJob's counts
trail the ledger by a reconcile tick); Redis trailing Postgres by the batch being recorded is
reported, with that explanation, since it is also what a stuck collector looks like.
"""

from __future__ import annotations

from dataclasses import dataclass

TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})


@dataclass(frozen=True)
class KubeView:
    """The MLJob's status (None fields: not written yet)."""

    phase: str | None
    total: int | None = None
    processed: int | None = None
    failed: int | None = None


@dataclass(frozen=True)
class LedgerView:
    """Postgres: the job row's phase (None: no row), registered items and result rows."""

    phase: str | None
    registered: int
    succeeded: int
    failed: int

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        return self.registered - self.processed


@dataclass(frozen=True)
class RedisView:
    """The job's Redis state (`present` False: no state, i.e. never written, cleaned up or lost)."""

    present: bool
    total: int = 0
    pending: int = 0
    failed: int = 0


@dataclass(frozen=True)
class NatsView:
    """Whether the job's consumer exists on its pipeline's task stream."""

    consumer: bool


def disagreements(
    kube: KubeView, ledger: LedgerView | None, redis: RedisView | None, nats: NatsView | None
) -> list[str]:
    """One plain sentence per disagreement between the stores that could be read."""
    found: list[str] = []
    if ledger is not None:
        found += _kube_and_ledger(kube, ledger)
    if redis is not None:
        found += _redis(kube, ledger, redis)
    if nats is not None:
        found += _nats(kube, ledger, nats)
    return found


def _kube_and_ledger(kube: KubeView, ledger: LedgerView) -> list[str]:
    found: list[str] = []
    phase, row = kube.phase, ledger.phase
    if row is None:
        if phase not in (None, "Pending"):
            found.append(f"Postgres has no row for this job, though the MLJob is {phase}")
        return found
    if phase != row and (phase in TERMINAL or row in TERMINAL):
        if phase in TERMINAL and row in TERMINAL:
            found.append(
                f"the MLJob says {phase}, Postgres says {row}: Postgres decides the verdict, and the "
                "MLJob is corrected to it"
            )
        elif row in TERMINAL:
            found.append(
                f"Postgres holds the verdict {row}, the MLJob still says {phase or 'nothing'}: the "
                "operator writes it to the MLJob on its next look at the job"
            )
        else:
            found.append(
                f"the MLJob says {phase}, Postgres still says {row}: the operator records the "
                "MLJob's verdict in Postgres when it cleans the job up"
            )
    if phase in TERMINAL and kube.processed is not None:
        failed = kube.failed or 0
        if (kube.processed, failed) != (ledger.processed, ledger.failed):
            late = ledger.processed - kube.processed
            found.append(
                f"the MLJob counts {kube.processed:,} processed and {failed:,} failed, Postgres holds "
                f"{ledger.processed:,} results and {ledger.failed:,} failures"
                + (f" ({late:,} arrived after the verdict, which they do not change)" if late > 0 else "")
            )
    counted = phase == "Running" or (phase in TERMINAL and ledger.registered > 0)
    if counted and kube.total is not None and kube.total != ledger.registered:
        found.append(f"the MLJob counts {kube.total:,} items, Postgres registered {ledger.registered:,}")
    return found


def _redis(kube: KubeView, ledger: LedgerView | None, redis: RedisView) -> list[str]:
    phase = kube.phase
    if phase in TERMINAL:
        if redis.present:
            return [
                "Redis still holds this finished job's state: its cleanup has not run yet "
                "(if this stays, the operator's log says why)"
            ]
        return []
    if phase != "Running":
        return []
    if not redis.present:
        return [
            "Redis has no state for this running job: the operator rebuilds it from Postgres on its "
            "next look at the job"
        ]
    if ledger is None:
        return []
    found: list[str] = []
    if redis.total != ledger.registered:
        found.append(f"Redis counts {redis.total:,} items, Postgres registered {ledger.registered:,}")
    if redis.pending > ledger.pending:
        found.append(
            f"Redis counts {redis.pending:,} items pending, Postgres {ledger.pending:,}: results are "
            "stored in Postgres first, so Redis trails it by the batch being recorded; if the gap "
            "stays, the collector is stuck between the two"
        )
    elif redis.pending < ledger.pending:
        found.append(
            f"Redis counts {redis.pending:,} items pending, Postgres {ledger.pending:,} (items without "
            "a result): before a verdict the operator checks the ledger and rebuilds Redis from it"
        )
    return found


def _nats(kube: KubeView, ledger: LedgerView | None, nats: NatsView) -> list[str]:
    phase = kube.phase
    if phase in TERMINAL and nats.consumer:
        return [
            "NATS still holds this finished job's consumer: its cleanup has not run yet "
            "(if this stays, the operator's log says why)"
        ]
    pending = ledger.pending if ledger is not None else None
    if phase == "Running" and not nats.consumer and pending != 0:
        count = f"{pending:,} items are" if pending is not None else "items are"
        return [
            f"the job's consumer is gone from NATS while {count} pending: the operator recreates it "
            "and publishes those items again"
        ]
    return []
