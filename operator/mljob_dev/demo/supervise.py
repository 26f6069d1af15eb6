"""Keep N worker processes alive for `make demo`, as a Deployment's restart policy would.

Each dead worker is started again (its log appended to), and every death is written to a state
file the progress bar and the final report read. On SIGTERM or SIGINT the workers get SIGTERM
(their graceful stop), then SIGKILL after a grace period, and the supervisor exits only once
every one of them is reaped: the demo leaves no process behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO


@dataclass
class Slot:
    """One worker position: its current process and how many times it was started."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0


@dataclass
class Supervisor:
    command: list[str]
    workers: int
    log_dir: Path
    state_file: Path
    grace_seconds: float = 10.0
    slots: list[Slot] = field(default_factory=list)
    exits: list[dict[str, object]] = field(default_factory=list)
    stopping: bool = False
    _logs: dict[int, IO[bytes]] = field(default_factory=dict)

    def start(self, slot: Slot) -> None:
        slot.starts += 1
        log = self._logs.get(slot.index)
        if log is None:
            log = self._logs[slot.index] = open(self.log_dir / f"worker-{slot.index}.log", "ab")  # noqa: SIM115
        env = {**os.environ, "MLJOB_WORKER_ID": f"demo-w{slot.index}-{slot.starts}"}
        slot.proc = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def save(self) -> None:
        """Write the state atomically: readers never see half a file."""
        state = {
            "workers": self.workers,
            "crashes": len(self.exits),
            "exits": self.exits,
            "pids": [s.proc.pid for s in self.slots if s.proc is not None and s.proc.poll() is None],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def run(self) -> int:
        self.slots = [Slot(i) for i in range(1, self.workers + 1)]
        for slot in self.slots:
            self.start(slot)
        self.save()
        while not self.stopping:
            changed = False
            for slot in self.slots:
                assert slot.proc is not None
                code = slot.proc.poll()
                if code is not None and not self.stopping:
                    self.exits.append({"worker": slot.index, "code": code, "at": time.time()})
                    print(f"worker {slot.index} exited with status {code}; restarting it", flush=True)
                    self.start(slot)
                    changed = True
            if changed:
                self.save()
            time.sleep(0.1)
        self.stop_all()
        return 0

    def stop_all(self) -> None:
        """SIGTERM every worker, SIGKILL the ones still alive after the grace period, reap all."""
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + self.grace_seconds
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.save()
        for log in self._logs.values():
            log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mljob_dev.demo.supervise",
        usage="%(prog)s [options] -- COMMAND...",
        description=__doc__,
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--log-dir", type=Path, required=True, help="worker-<n>.log go here")
    parser.add_argument("--state", type=Path, required=True, help="JSON: deaths so far, live pids")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no worker command after --")
    supervisor = Supervisor(command, args.workers, args.log_dir, args.state)

    def stop(signum: int, frame: FrameType | None) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return supervisor.run()
    except BaseException:
        supervisor.stop_all()
        raise


if __name__ == "__main__":
    sys.exit(main())
