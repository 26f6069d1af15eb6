"""In-memory fakes of the adapters `mljob.controller.loop.JobLoop` uses: one small, consistent world.

Why: the loop and its actions decide from what Redis, Postgres, NATS and the API server say; the
e2e tests need all four running and take minutes per scenario. These fakes keep the semantics
the loop relies on (first outcome per item wins, the jobs row's compare-and-set, the MLJob's
guarded patch and the server's status rules, work-queue streams that can vanish) so every
recovery path can be driven tick by tick in milliseconds. They are only for unit tests of
decision and loop logic; the adapters themselves are tested against real servers.
"""

from support.fakes.clock import Clock
from support.fakes.world import FakeWorld

__all__ = ["Clock", "FakeWorld"]
