"""Memory of a benchmark's processes and of the stack's services, sampled in a thread.

* RSS of a process with its descendants (psutil), by PID: the benchmark's own roles and
  nats-server (the stack's `stack.json`).
* Redis `used_memory` (INFO memory): what the data set needs, not the allocator's RSS.
* JetStream: bytes and messages of every stream, from the NATS monitor's `jsz` (the stack's
  `MLJOB_NATS_MONITOR_URL`, plain HTTP on loopback: no identity needed).

A `Sampler` keeps the peak of each value and when it was seen, and the RSS over time of the
process it follows.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Mapping

import psutil

from . import common

SAMPLE_SECONDS = 0.5


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (0 once it is gone)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def stream_state(monitor_url: str) -> dict[str, int]:
    """`stream:<name>` -> bytes stored and `messages:<name>` -> messages, of every stream of every
    account, from the NATS monitor's `jsz`."""
    with urllib.request.urlopen(f"{monitor_url}/jsz?accounts=true&streams=true", timeout=5) as resp:
        info = json.load(resp)
    out = {}
    for account in info.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            state = stream.get("state") or {}
            out[f"stream:{stream['name']}"] = int(state.get("bytes", 0))
            out[f"messages:{stream['name']}"] = int(state.get("messages", 0))
    return out


class Sampler:
    """Every `SAMPLE_SECONDS` in a thread: RSS of each named process tree, Redis `used_memory`,
    stream bytes and messages; keeps the peak of each and when it was seen, and the RSS over time
    of the process named `follow`."""

    def __init__(self, stack: common.BenchStack, procs: Mapping[str, int], follow: str) -> None:
        import redis

        self.procs = dict(procs)
        self._nats = stack.service_pids().get("nats")
        self._redis = redis.Redis.from_url(stack.env["MLJOB_REDIS_URL"])
        self._monitor = stack.env.get("MLJOB_NATS_MONITOR_URL")
        self.peaks: dict[str, int] = {}
        self.peak_at: dict[str, float] = {}
        self.samples = 0
        self.follow = follow
        #: (monotonic time, RSS of `follow`) of every sample
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> dict[str, int]:
        """One sample: process name -> RSS (and `nats-server`'s), `redis` -> used_memory, the
        streams' state."""
        values = {name: tree_rss(pid) for name, pid in self.procs.items()}
        values["redis"] = int(self._redis.info("memory")["used_memory"])
        if self._nats:
            values["nats-server"] = tree_rss(self._nats)
        if self._monitor:
            with contextlib.suppress(OSError, ValueError):
                values.update(stream_state(self._monitor))
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            values = self.sample()
            for name, value in values.items():
                if value > self.peaks.get(name, -1):
                    self.peaks[name], self.peak_at[name] = value, now
            self.series.append((now, values.get(self.follow, 0)))
            self.samples += 1
            self._stop.wait(SAMPLE_SECONDS)

    def rss_at(self, when: float) -> int | None:
        """The RSS of `follow` in the last sample at or before `when` (monotonic)."""
        seen = [rss for t, rss in self.series if t <= when]
        return seen[-1] if seen else None

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._redis.close()


def baseline(sampler: Sampler, settle: float = 3.0) -> dict[str, int]:
    """The median of a few samples over `settle` seconds, taken while the processes are idle."""
    rounds = []
    for _ in range(5):
        time.sleep(settle / 5)
        rounds.append(sampler.sample())
    return {k: sorted(r.get(k, 0) for r in rounds)[len(rounds) // 2] for k in rounds[-1]}
