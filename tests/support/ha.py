"""The clustered stack as the fault tests see it (issue 15): two operators under leader
election, two external collectors, workers, and the faults: kill or stop one node of a
server, the active operator, a collector.

Every process runs on the clustered stack's addresses: the three NATS URLs, the Redis Cluster
(`MLJOB_REDIS_CLUSTER`), the multi-host Postgres DSN. `HA` is an `E2E` (the same MLJobs, stores
and invariants) with more than one operator and collector.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.env import E2E
from support.harness import Proc, mljob_cmd
from support.waiting import wait_for

#: Short leases so the standby takes over in seconds (the chart's defaults are 15/10/2); a job
#: consumer silent for 20 s is replaced (120 s by default), and a consumer its lost server held
#: is swept soon after the server is back.
LEASE = {
    "MLJOB_LEASE_DURATION_SECONDS": "6",
    "MLJOB_RENEW_DEADLINE_SECONDS": "4",
    "MLJOB_RETRY_PERIOD_SECONDS": "1",
    "MLJOB_CONSUMER_REPLACE_SECONDS": "20",
    "MLJOB_ORPHAN_SWEEP_INTERVAL": "10",
    "MLJOB_ORPHAN_GRACE_SECONDS": "20",
}


@dataclass
class HA(E2E):
    operators: list[Proc] = field(default_factory=list)
    collectors: list[Proc] = field(default_factory=list)

    def devstack(self) -> Any:
        """The running stack's state (PIDs, ports), read fresh: a restart replaces PIDs."""
        from mljob_dev.devstack.stack import Stack

        return Stack.load(Path(self.stack.directory))

    # ------------------------------------------------------------------ processes
    def start_operators(self, count: int = 2, **env: str) -> list[Proc]:
        for n in range(count):
            self.start_operator_replica(n, **env)
        return self.operators

    def start_operator_replica(self, n: int, **env: str) -> Proc:
        proc = Proc(
            f"operator-{n}",
            mljob_cmd(
                "operator",
                *("--namespace", self.namespace, "--leader-elect", "--no-collector"),
                *("--lease-namespace", self.namespace),
            ),
            # Each replica its own metrics port (two on one host cannot share the default).
            {**self.env, **LEASE, "MLJOB_METRICS_PORT": "0", **env},
            self.log_dir,
        )
        self.operators.append(proc)
        self.procs.append(proc)
        self.operator = proc
        return proc

    def start_collectors(self, count: int = 2, **env: str) -> list[Proc]:
        for n in range(count):
            self.collectors.append(self.start_collector(f"collector-{n}", **env))
        return self.collectors

    def leader(self, timeout: float = 60) -> Proc:
        """The operator replica holding the Lease (its identity is host name and PID)."""
        host = socket.gethostname()

        def holder() -> Proc | None:
            got = self.kubectl.run(
                "-n", self.namespace, "get", "lease", "mljob-operator", "-o", "json", check=False
            )
            if got.returncode != 0:
                return None
            identity = json.loads(got.stdout).get("spec", {}).get("holderIdentity")
            for proc in self.operators:
                if proc.alive() and identity == f"{host}-{proc.popen.pid}":
                    return proc
            return None

        found: Proc = wait_for(holder, timeout, what="an operator replica to hold the Lease")
        return found

    # ------------------------------------------------------------------ progress
    def progress(self, name: str) -> int:
        status = self.status(name)
        return int(status.get("processed") or 0)

    def wait_progress(self, name: str, beyond: int, timeout: float = 60) -> int:
        """Wait until the job's processed count passes `beyond` (work is moving again)."""
        start = time.monotonic()
        wait_for(lambda: self.progress(name) > beyond, timeout, interval=0.5, what=f"{name} past {beyond}")
        return int(time.monotonic() - start)
