"""A Redis Cluster for the local stack: three primaries and a replica each, on loopback (issue 15's
clustered stack starts here; nothing in the single-node stack uses it yet).

Why this shape: it is the smallest cluster whose primaries can each fail over (a replica needs a
majority of primaries to elect it). Persistence is off, as in the single-node stack: what a
cluster loses by design (replication is asynchronous) the operator rebuilds from its ledger.
`cluster-node-timeout` is short so a killed primary's replica takes over in seconds, not the
default 15.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mljob_dev.devstack.restart import stop_one
from mljob_dev.devstack.stack import Stack, StackError, _require, free_port

PRIMARIES = 3
#: Milliseconds a primary may be unreachable before its replica is promoted.
NODE_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class ClusterNode:
    name: str  # the stack's process name, redis-cluster-<n>
    port: int


def _cli(port: int, *args: str) -> str:
    """One command to one node through redis-cli (installed with redis-server)."""
    cli = _require("redis-cli", "apt-get install redis-tools")
    proc = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True, timeout=10
    )
    return proc.stdout if proc.returncode == 0 else ""


def cluster_info(port: int) -> dict[str, str]:
    lines = _cli(port, "CLUSTER", "INFO").splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


def _state_ok(port: int) -> bool:
    return cluster_info(port).get("cluster_state") == "ok"


def _answers(port: int) -> bool:
    return _cli(port, "PING").strip() == "PONG"


def role(port: int) -> str:
    """`master` or `slave`, as the node itself reports it ("" when it does not answer)."""
    lines = _cli(port, "ROLE").splitlines()
    return lines[0].strip() if lines else ""


def start(stack: Stack, primaries: int = PRIMARIES) -> list[ClusterNode]:
    """Start 2 x `primaries` nodes, join them with `redis-cli --cluster create` (one replica
    per primary), wait until every node reports `cluster_state:ok`; sets MLJOB_REDIS_CLUSTER_URL
    (one node's address: a cluster client finds the others from it)."""
    binary = _require("redis-server", "apt-get install redis-server")
    cli = _require("redis-cli", "apt-get install redis-tools")
    nodes = [ClusterNode(f"redis-cluster-{i + 1}", free_port()) for i in range(2 * primaries)]
    for node in nodes:
        workdir = stack.directory / node.name
        workdir.mkdir(parents=True, exist_ok=True)
        stack.spawn(node.name, _server_command(binary, node.port, workdir))
    for node in nodes:
        stack.wait_ready(node.name, partial(_answers, node.port))
    create = subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if create.returncode != 0:
        raise StackError(
            f"redis-cli --cluster create failed:\n{create.stdout[-2000:]}{create.stderr[-2000:]}"
        )
    for node in nodes:
        stack.wait_ready(node.name, partial(_state_ok, node.port), 60)
    stack.env["MLJOB_REDIS_CLUSTER_URL"] = f"redis://127.0.0.1:{nodes[0].port}/0"
    return nodes


def _server_command(binary: str, port: int, workdir: Path) -> list[str]:
    return [
        binary,
        *("--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "no"),
        # The bus port is its own free port (the default, port + 10000, may be taken or too high).
        *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
        *("--cluster-config-file", "nodes.conf"),
        *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
        *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
    ]


def kill(stack: Stack, node: ClusterNode) -> None:
    """SIGKILL one node (a crash: no clean hand-over), as the failover tests need."""
    stop_one(stack, node.name, grace=0.0, first=signal.SIGKILL)
