"""Postgres for the clustered local stack: a primary and a streaming standby on loopback, with
automatic failover by Patroni on the stack's etcd (issue 15).

Why Patroni (Debian's `patroni`, `scripts/install-deps --ha`): it is what such clusters run in
production, and its leader key in etcd (a lease of `TTL` seconds, renewed every `LOOP_WAIT`) is
the fencing: a node writes only while it holds the key, a node that comes back without it starts
as a standby of the holder, rewound with `pg_rewind` when its timeline diverged. So there are
never two writable primaries. `TTL` is short so a killed primary's standby is promoted within
about ten seconds, not Patroni's default thirty.

Patroni starts its postmaster in a session of its own, so killing Patroni leaves Postgres
running: a crash of a node is both processes killed. Each postmaster is therefore started
through a one-line wrapper (`setsid`) that makes it the leader of its own process group, and
is recorded in the stack as `postgres-<n>` (ahead of `patroni-<n>`, so that `Stack.stop` stops
Patroni first, which stops its Postgres cleanly). `kill_primary` SIGKILLs both.

Replication is synchronous (Patroni's `synchronous_mode`, `synchronous_commit=remote_write`):
a commit returns once the standby has written it, so what a client was told is stored survives
the primary's crash (with asynchronous replication the last commits before it would be lost,
and a result acked to NATS with them). Alone, the primary stops waiting (Patroni empties
`synchronous_standby_names` within a round). Otherwise durability is traded for speed as in
the single-node stack (`fsync=off`: a killed process loses nothing the kernel has);
`full_page_writes` and `wal_log_hints` stay on, which `pg_rewind` needs. Clients use the libpq
multi-host DSN in `MLJOB_POSTGRES_DSN` with `target_session_attrs=read-write`: whichever node
is the primary now.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mljob_dev.devstack.restart import stop_one
from mljob_dev.devstack.stack import (
    Stack,
    StackError,
    _postgres_bindir,
    _postgres_execute,
    _require,
    free_port,
)

NODES = 2
#: Seconds the leader key outlives its last renewal: the bound on a dead primary's reign.
TTL = 8
#: Seconds between Patroni's rounds (the leader renews its key each round).
LOOP_WAIT = 1
#: Seconds a DCS or Postgres call may take before Patroni gives up on it (LOOP_WAIT + 2 x this
#: must stay within TTL).
RETRY_TIMEOUT = 3
SCOPE = "mljob"
NAMESPACE = "/mljob-postgres/"
STATE_FILE = "postgres-ha.json"


@dataclass(frozen=True)
class PostgresNode:
    n: int  # 1 or 2
    port: int  # Postgres
    api_port: int  # Patroni's REST API

    @property
    def name(self) -> str:
        """The Patroni process of the stack (`patroni-<n>`)."""
        return f"patroni-{self.n}"

    @property
    def postmaster(self) -> str:
        """The Postgres process group of the stack (`postgres-<n>`)."""
        return f"postgres-{self.n}"


def nodes(stack: Stack) -> list[PostgresNode]:
    data = json.loads((stack.directory / STATE_FILE).read_text())
    return [PostgresNode(**node) for node in data["nodes"]]


def dsn(nodes: list[PostgresNode], database: str = "mljob") -> str:
    hosts = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"


def start(stack: Stack, etcd_url: str | None = None) -> list[PostgresNode]:
    """Start two Patroni nodes on `etcd_url` (the stack's etcd, started here when None), wait for
    a primary and a streaming standby, create the database `mljob`; sets MLJOB_POSTGRES_DSN (the
    multi-host DSN that reaches the primary, whichever node it is)."""
    _require("patroni", "scripts/install-deps --ha (apt-get install patroni)")
    if etcd_url is None:
        etcd_url = stack.start_etcd()
    bindir = _wrapped_bindir(stack.directory / "postgres-ha-bin")
    created = [PostgresNode(i + 1, free_port(), free_port()) for i in range(NODES)]
    (stack.directory / STATE_FILE).write_text(
        json.dumps({"etcd": etcd_url, "bindir": str(bindir), "nodes": [asdict(n) for n in created]})
    )
    for node in created:
        _write_config(stack, node, etcd_url, bindir)
    first, *others = created
    start_node(stack, first.n)
    _wait(stack, lambda: primary(stack) == first, 90, "the first Patroni node to become primary")
    for node in others:
        start_node(stack, node.n)
    _wait(stack, lambda: streaming(stack) == len(others), 90, "the standby to stream from the primary")
    admin = dsn(created, "postgres")
    _postgres_execute(admin, "CREATE DATABASE mljob")
    stack.env["MLJOB_POSTGRES_DSN"] = dsn(created)
    stack.save()
    return created


def start_node(stack: Stack, n: int) -> None:
    """Start node `n`'s Patroni (a new one, or one that was killed): it joins as a standby of
    whoever holds the leader key, rewinding its data when it had diverged."""
    node = next(x for x in nodes(stack) if x.n == n)
    workdir = stack.directory / node.name
    user = "postgres" if os.geteuid() == 0 else None  # postgres refuses to run as root
    if user is not None:
        shutil.chown(workdir, user=user)
    stack.spawn(node.name, ["patroni", str(workdir / "patroni.yml")], user=user)
    _wait(stack, lambda: _track_postmaster(stack, node), 60, f"{node.name} to start Postgres")


def primary(stack: Stack) -> PostgresNode | None:
    """The node that holds the leader key and whose Postgres takes writes now (None meanwhile:
    Patroni names the new leader while its Postgres is still finishing the promotion)."""
    for node in nodes(stack):
        if _api_status(node, "primary") == 200 and _writable(node):
            return node
    return None


def wait_primary(stack: Stack, other_than: PostgresNode | None = None, timeout: float = 90.0) -> PostgresNode:
    """Wait until a node (another than `other_than`, the one just lost) is primary and takes
    writes; that node. Patroni promotes a standby once the lost leader's key expires (its TTL)."""
    found: list[PostgresNode] = []

    def promoted() -> bool:
        leader = primary(stack)
        if leader is None or (other_than is not None and leader.n == other_than.n):
            return False
        found.append(leader)
        return True

    _wait(stack, promoted, timeout, "a Postgres standby to be promoted")
    return found[-1]


def _writable(node: PostgresNode) -> bool:
    import psycopg

    try:
        with psycopg.connect(_node_dsn(node), connect_timeout=2) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return False
    return row is not None and row[0] is False


def _node_dsn(node: PostgresNode, database: str = "postgres") -> str:
    return f"postgresql://postgres@127.0.0.1:{node.port}/{database}"


def streaming(stack: Stack) -> int:
    """How many standbys the primary streams to synchronously now (0 without a primary)."""
    leader = primary(stack)
    if leader is None:
        return 0
    import psycopg

    try:
        with psycopg.connect(_node_dsn(leader), connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'sync'"
            ).fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row else 0


def switchover(stack: Stack, candidate: PostgresNode, timeout: float = 90.0) -> None:
    """Make `candidate` the primary by a planned switchover (Patroni's REST API), the other node
    back as its streaming standby; nothing when it is primary already."""
    leader = wait_primary(stack, timeout=timeout)
    if leader.n == candidate.n:
        return
    body = json.dumps({"leader": leader.name, "candidate": candidate.name}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{leader.api_port}/switchover",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        if resp.status != 200:
            raise StackError(f"Patroni refused the switchover to {candidate.name}: {resp.read()!r}")
    _wait(
        stack, lambda: (primary(stack) or leader).n == candidate.n, timeout, f"{candidate.name} to be primary"
    )
    _wait(stack, lambda: streaming(stack) == NODES - 1, timeout, "the standby to stream from the primary")


def terminate_clients(stack: Stack, database: str = "mljob") -> int:
    """End every client session of `database` on the primary (what a network blip or a pooler
    restart does): each process reconnects through its DSN. How many were ended."""
    import psycopg

    leader = wait_primary(stack)
    with psycopg.connect(_node_dsn(leader), connect_timeout=2, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def kill_primary(stack: Stack) -> PostgresNode:
    """SIGKILL the primary's Patroni and its Postgres (a crash of that node); returns the node."""
    leader = primary(stack)
    if leader is None:
        raise StackError("no Postgres node is primary now")
    kill(stack, leader)
    return leader


def kill(stack: Stack, node: PostgresNode) -> None:
    """SIGKILL one node: Patroni first (so nothing restarts its Postgres), then Postgres."""
    _track_postmaster(stack, node)
    stop_one(stack, node.name, grace=0.0, first=signal.SIGKILL)
    if node.postmaster in stack.pids:
        stop_one(stack, node.postmaster, grace=0.0, first=signal.SIGKILL)
        del stack.pids[node.postmaster]
    del stack.pids[node.name]
    stack.save()


# ---------------------------------------------------------------------- helpers
def _wait(stack: Stack, check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    logs = "\n".join(f"--- {name}\n{stack.log_tail(name, 15)}" for name in stack.pids if "patroni" in name)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}:\n{logs}")


def _api_status(node: PostgresNode, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/{path}", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _track_postmaster(stack: Stack, node: PostgresNode) -> bool:
    """Record the node's running postmaster (its pid is its process group) as `postgres-<n>`,
    ahead of `patroni-<n>`; True once one runs. Patroni restarts Postgres on a demotion, so the
    pid is read again before every kill."""
    pidfile = stack.directory / node.name / "data" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    if os.getpgid(pid) != pid:
        return False  # not started through the wrapper (yet)
    entries = [(k, v) for k, v in stack.pids.items() if k != node.postmaster]
    at = next((i for i, (k, _) in enumerate(entries) if k == node.name), len(entries))
    entries.insert(at, (node.postmaster, pid))
    stack.pids.clear()
    stack.pids.update(entries)
    stack.save()
    return True


def _wrapped_bindir(target: Path) -> Path:
    """Postgres' binaries, the postmaster made a process-group leader (see the module docstring)."""
    real = _postgres_bindir()
    target.mkdir(parents=True, exist_ok=True)
    for binary in real.iterdir():
        link = target / binary.name
        if binary.name == "postgres":
            link.write_text(f'#!/bin/sh\nexec setsid {binary} "$@"\n')
            link.chmod(0o755)
        elif not link.exists():
            link.symlink_to(binary)
    return target


def _write_config(stack: Stack, node: PostgresNode, etcd: str, bindir: Path) -> None:
    workdir = stack.directory / node.name
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    trust = [
        "local all all trust",
        "host all all 127.0.0.1/32 trust",
        "host replication all 127.0.0.1/32 trust",
    ]
    config = {
        "scope": SCOPE,
        "namespace": NAMESPACE,
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {"listen": f"127.0.0.1:{node.api_port}", "connect_address": f"127.0.0.1:{node.api_port}"},
        "etcd3": {"hosts": [etcd.removeprefix("http://")], "protocol": "http"},
        "bootstrap": {
            "dcs": {
                "ttl": TTL,
                "loop_wait": LOOP_WAIT,
                "retry_timeout": RETRY_TIMEOUT,
                "maximum_lag_on_failover": 1048576,
                # A commit returns once the standby has it (see the module docstring).
                "synchronous_mode": True,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "remove_data_directory_on_rewind_failure": True,
                    "remove_data_directory_on_diverged_timelines": True,
                    "parameters": {
                        "fsync": "off",
                        "synchronous_commit": "remote_write",
                        "full_page_writes": "on",
                        "wal_log_hints": "on",
                        "max_connections": 300,
                        "wal_keep_size": "128MB",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}, "no-sync"],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{node.port}",
            "connect_address": f"127.0.0.1:{node.port}",
            "data_dir": str(workdir / "data"),
            "bin_dir": str(bindir),
            "pgpass": str(workdir / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {"username": "postgres"},
                "rewind": {"username": "postgres"},
            },
            "parameters": {"unix_socket_directories": str(workdir)},
            "pg_hba": trust,
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
    }
    # JSON is YAML: no YAML writer needed.
    (workdir / "patroni.yml").write_text(json.dumps(config, indent=2))
