"""Restart one service of a running local stack: the same port, the same data directory.

Why: the chaos suite and runbooks need "NATS/Postgres/Redis went away and came back" with
every client configured as before, so clients must find the service again at the same address.
What survives is what the real service keeps on disk: NATS JetStream its file store (the stack
directory's `jetstream`), Postgres its data directory; Redis runs without persistence, so a
restart empties it (a FLUSHALL plus refused connections while it is down).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

from mljob_dev.devstack.stack import Stack, StackError, _terminate

#: Service name on the command line -> process name in the stack's state file.
SERVICES = {"nats": "nats-server", "redis": "redis-server", "postgres": "postgres"}
#: How each stops cleanly: postgres' SIGTERM waits for every client to disconnect (a pooled
#: client never does), its SIGINT is the "fast" shutdown that ends sessions and checkpoints.
STOP_SIGNALS = {"nats-server": signal.SIGTERM, "redis-server": signal.SIGTERM, "postgres": signal.SIGINT}


def _port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise StackError(f"no port in {url!r}")
    return port


def stop_one(stack: Stack, process: str, grace: float = 20.0, first: signal.Signals | None = None) -> None:
    """Stop one process group of the stack by PID: `first` (else the service's clean signal),
    then SIGKILL after `grace`. `first=SIGKILL` is a crash."""
    pid = stack.pids.get(process)
    if pid is None:
        raise StackError(f"the stack in {stack.directory} has no {process}")
    if not _terminate(pid, grace, first or STOP_SIGNALS[process]):
        raise StackError(f"{process} (pid {pid}) did not stop")


def stop(directory: Path, name: str) -> Stack:
    """Stop `name` (nats, redis or postgres) cleanly; `start` brings it back where it was."""
    if name not in SERVICES:
        raise StackError(f"cannot restart {name!r}: choose one of {', '.join(SERVICES)}")
    stack = Stack.load(directory)
    stop_one(stack, SERVICES[name])
    return stack


def start(directory: Path, name: str) -> Stack:
    """Start `name` again on the same port(s) with the same data, wait until it answers; the
    state file gets the new PID."""
    if name not in SERVICES:
        raise StackError(f"cannot restart {name!r}: choose one of {', '.join(SERVICES)}")
    stack = Stack.load(directory)
    if name == "nats":
        stack.start_nats(_port(stack.env["MLJOB_NATS_URL"]), _port(stack.env["MLJOB_NATS_MONITOR_URL"]))
    elif name == "redis":
        stack.start_redis(_port(stack.env["MLJOB_REDIS_URL"]))
    else:
        stack.start_postgres(_port(stack.env["MLJOB_POSTGRES_DSN"]))
    stack.save()
    return stack


def restart(directory: Path, name: str, down_seconds: float = 0.0) -> Stack:
    """Stop `name`, keep it down `down_seconds`, start it again (see `stop` and `start`)."""
    stop(directory, name)
    if down_seconds > 0:
        time.sleep(down_seconds)
    return start(directory, name)
