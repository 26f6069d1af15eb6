"""A Redis Cluster for the local stack: three primaries and a replica each, on loopback (issue 15's
clustered stack starts here; nothing in the single-node stack uses it yet).

Why this shape: it is the smallest cluster whose primaries can each fail over (a replica needs a
majority of primaries to elect it). Persistence is off, as in the single-node stack: what a
cluster loses by design (replication is asynchronous) the operator rebuilds from its ledger.
`cluster-node-timeout` is short so a killed primary's replica takes over in seconds, not the
default 15.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mljob_dev.devstack.restart import stop_one
from mljob_dev.devstack.stack import Stack, StackError, _require, free_port

PRIMARIES = 3
#: The stack variable naming every node: `redis-cluster-1=<port>/<bus port>,...`.
NODES_VAR = "MLJOB_REDIS_CLUSTER_NODES"
#: Milliseconds a primary may be unreachable before its replica is promoted.
NODE_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class ClusterNode:
    name: str  # the stack's process name, redis-cluster-<n>
    port: int
    bus_port: int = 0  # the cluster bus; kept so a restarted node rejoins where it was


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


def _replicas_linked(nodes: list[ClusterNode], primaries: int) -> bool:
    """Whether `primaries` nodes are replicas whose link to their primary is up."""
    linked = 0
    for node in nodes:
        info = dict(
            line.strip().split(":", 1)
            for line in _cli(node.port, "INFO", "replication").splitlines()
            if ":" in line
        )
        linked += info.get("role") == "slave" and info.get("master_link_status") == "up"
    return linked >= primaries


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
    nodes = [ClusterNode(f"redis-cluster-{i + 1}", free_port(), free_port()) for i in range(2 * primaries)]
    stack.env[NODES_VAR] = ",".join(f"{n.name}={n.port}/{n.bus_port}" for n in nodes)
    for node in nodes:
        workdir = stack.directory / node.name
        workdir.mkdir(parents=True, exist_ok=True)
        stack.spawn(node.name, _server_command(binary, node, workdir))
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
    # `--cluster create` returns before the replicas are attached: a primary killed then has none.
    stack.wait_ready(nodes[0].name, partial(_replicas_linked, nodes, primaries), 60)
    stack.env["MLJOB_REDIS_CLUSTER_URL"] = f"redis://127.0.0.1:{nodes[0].port}/0"
    return nodes


def _server_command(binary: str, node: ClusterNode, workdir: Path) -> list[str]:
    return [
        binary,
        *("--bind", "127.0.0.1", "--port", str(node.port), "--protected-mode", "no"),
        # The bus port is its own free port (the default, port + 10000, may be taken or too high).
        *("--cluster-enabled", "yes", "--cluster-port", str(node.bus_port)),
        *("--cluster-config-file", "nodes.conf"),
        *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
        *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
    ]


def kill(stack: Stack, node: ClusterNode) -> None:
    """SIGKILL one node (a crash: no clean hand-over), as the failover tests need."""
    stop_one(stack, node.name, grace=0.0, first=signal.SIGKILL)


def nodes(stack: Stack) -> list[ClusterNode]:
    """The cluster's nodes as `start` recorded them in the stack's environment."""
    found = []
    for entry in stack.env.get(NODES_VAR, "").split(","):
        if entry:
            name, _, ports = entry.partition("=")
            port, _, bus = ports.partition("/")
            found.append(ClusterNode(name, int(port), int(bus)))
    return found


def primary_of(stack: Stack, key: str) -> ClusterNode:
    """The node serving `key`'s slot now (asked of a live node: CLUSTER KEYSLOT, CLUSTER SLOTS)."""
    for node in nodes(stack):
        slot_text = _cli(node.port, "CLUSTER", "KEYSLOT", key).strip()
        slots = _cli(node.port, "--json", "CLUSTER", "SLOTS").strip()
        if not slot_text or not slots:
            continue
        slot = int(slot_text)
        for low, high, serving, *_ in json.loads(slots):
            if low <= slot <= high:
                port = int(serving[1])
                return next(n for n in nodes(stack) if n.port == port)
    raise StackError(f"no node of the Redis Cluster answers for the slot of {key!r}")


def wait_promoted(stack: Stack, killed: ClusterNode, timeout: float = 60.0) -> None:
    """Wait until no live node's slot map names `killed` as serving a slot and every live node
    says `cluster_state:ok`: its replica took its slots over (about `cluster-node-timeout`
    plus an election)."""
    deadline = time.monotonic() + timeout
    alive = [n for n in nodes(stack) if n != killed]
    while time.monotonic() < deadline:
        if all(_state_ok(n.port) and not _serves(n, killed) for n in alive):
            return
        time.sleep(0.2)
    raise StackError(f"no replica of {killed.name} was promoted within {timeout:.0f}s")


def _serves(asked: ClusterNode, node: ClusterNode) -> bool:
    """Whether `asked`'s slot map (CLUSTER SLOTS) has `node` serving any slot."""
    slots = _cli(asked.port, "--json", "CLUSTER", "SLOTS").strip()
    if not slots:
        return True  # no answer: not known to be over
    return any(int(serving[1]) == node.port for _low, _high, serving, *_ in json.loads(slots))


def start_node(stack: Stack, node: ClusterNode) -> None:
    """Start a stopped node again on its ports with its `nodes.conf`: it rejoins the cluster (a
    replica of its heir, when it was a primary that failed over) and answers `cluster_state:ok`."""
    binary = _require("redis-server", "apt-get install redis-server")
    stack.spawn(node.name, _server_command(binary, node, stack.directory / node.name))
    stack.wait_ready(node.name, partial(_answers, node.port))
    stack.wait_ready(node.name, partial(_state_ok, node.port), 60)
    stack.save()
