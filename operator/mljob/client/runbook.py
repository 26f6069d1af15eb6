"""What the runbook (docs/operations.md) says about each disagreement the read-only API reports.

The API words a disagreement between the stores as a sentence (`httpapi.disagree`); here each
kind of sentence is matched to its runbook entry, with the entry's gist, so `mljob status` can
say what it means and whether anyone needs to act. Pure. A test keeps every heading named here
equal to one in docs/operations.md, and every sentence the API can write matched to an entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOC = "docs/operations.md"


@dataclass(frozen=True)
class Entry:
    """A runbook section: its heading (as written in the doc) and what it says, in a line."""

    heading: str
    says: str

    def cite(self) -> str:
        return f'{DOC}, "{self.heading}"'


ROW_3 = Entry(
    "Row 3 — consumer counters disagree (`num_ack_pending`)",
    "the operator never decides from num_ack_pending; count what is unresolved from the ledger instead",
)
ROW_7 = Entry(
    "Row 7 — `kubectl` and Postgres disagree",
    "Postgres arbitrates and the operator mirrors the verdict on its next tick: nothing to do; if it "
    "lasts, the operator is not running or cannot reach a store (its log says which)",
)
ROW_8 = Entry(
    "Row 8 — Redis state missing and nothing to rebuild it from",
    "the operator never finishes on counts the ledger does not back: it rebuilds Redis from the "
    "ledger, or waits for the ledger's items (StateAvailable=False says why)",
)
ROW_10 = Entry(
    "Row 10 — results arrive after cleanup, or for a job that was never dispatched",
    "late results are stored and change nothing: the verdict stands; nothing to do",
)
ROW_11 = Entry(
    "Row 11 — the job's stream or consumer vanished (NATS restart without storage, a manual delete)",
    "the operator recreates stream and consumer on a quiet tick and re-publishes the items without "
    "a result (at most MLJOB_MAX_STREAM_RECREATIONS times, then the job fails StreamLost)",
)
ROW_12 = Entry(
    "Row 12 — Redis lost the job's state (FLUSHALL, failover without persistence, eviction)",
    "the operator rebuilds the state from Postgres on its next tick (Event StateRebuilt); the job "
    "ends with exact counts; if it repeats, check Redis' eviction policy and persistence",
)
ROW_13 = Entry(
    "Row 13 — streams, registry entries or Redis keys left behind",
    "the finished job's cleanup has not run yet; the orphan sweep removes what is left after "
    "MLJOB_ORPHAN_GRACE_SECONDS (mljob chaos list-orphans shows it)",
)
STORE_DOWN = Entry(
    "A store is down (NATS, Redis, Postgres)",
    "results are stored in Postgres before Redis: a gap that stays means the collector cannot "
    "reach Redis; bring the store back, nothing is replayed by hand",
)
WHERE = Entry("Where the truth is", "which store holds what, and how to look at each")

#: (pattern of the API's sentence, its entry), first match wins.
MATCHES: tuple[tuple[re.Pattern[str], Entry], ...] = tuple(
    (re.compile(pattern), entry)
    for pattern, entry in (
        (r"^Postgres has no row for this job", ROW_7),
        (r"^the MLJob says \S+, Postgres (still )?says", ROW_7),
        (r"^Postgres holds the verdict", ROW_7),
        (r"arrived after the verdict", ROW_10),
        (r"^the MLJob counts [\d,]+ processed", ROW_7),
        (r"^the MLJob counts [\d,]+ items, Postgres registered", ROW_8),
        (r"^Redis still holds this finished job's state", ROW_13),
        (r"^Redis has no state for this running job", ROW_12),
        (r"^Redis counts [\d,]+ items, Postgres registered", ROW_8),
        (r"^Redis counts [\d,]+ items pending, Postgres [\d,]+: results are stored", STORE_DOWN),
        (r"^Redis counts [\d,]+ items pending, Postgres [\d,]+ \(items without", ROW_8),
        (r"^NATS still holds this finished job's consumer", ROW_13),
        (r"^the job's consumer is gone from NATS", ROW_11),
    )
)
ENTRIES = (ROW_3, ROW_7, ROW_8, ROW_10, ROW_11, ROW_12, ROW_13, STORE_DOWN, WHERE)


def entry_for(sentence: str) -> Entry:
    """The runbook entry about one of the API's disagreement sentences (`WHERE` when none fits)."""
    for pattern, entry in MATCHES:
        if pattern.search(sentence):
            return entry
    return WHERE
