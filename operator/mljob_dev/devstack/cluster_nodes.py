"""One node of a clustered stack's servers, by its process name: kill it, start it again, and who
leads what (issue 15's chaos commands: `mljob dev stack kill|start NODE`, `mljob dev stack
leaders`).

The names are the stack's process names: `nats-1..3` (nats_cluster), `redis-cluster-1..6`
(redis_cluster), `patroni-1..2` (postgres_ha: its Patroni and its Postgres go together, as a
crashed host's would). A kill is SIGKILL: a crash, no clean hand-over of a leadership, the
fault the clustered servers are there to survive.
"""

from __future__ import annotations

from typing import Any

from mljob_dev.devstack import nats_cluster, postgres_ha, redis_cluster
from mljob_dev.devstack.stack import Stack, StackError


def names(stack: Stack) -> list[str]:
    """Every node of the stack's clustered servers, by process name."""
    if stack.env.get("MLJOB_STACK_HA") != "1":
        raise StackError(f"the stack in {stack.directory} is not clustered: start one with `up --ha`")
    return [
        *(n.name for n in nats_cluster.nodes(stack)),
        *(n.name for n in redis_cluster.nodes(stack)),
        *(n.name for n in postgres_ha.nodes(stack)),
    ]


def kill(stack: Stack, name: str) -> None:
    """SIGKILL one node."""
    _check(stack, name)
    if name.startswith("nats-"):
        nats_cluster.kill(stack, _nats(stack, name))
    elif name.startswith("redis-cluster-"):
        redis_cluster.kill(stack, _redis(stack, name))
    else:
        postgres_ha.kill(stack, _postgres(stack, name))
    stack.save()


def start(stack: Stack, name: str) -> None:
    """Start a killed node again on its ports with its data; returns once it has rejoined (a NATS
    node healthy, a Redis node in a cluster whose state is ok, a Patroni node running Postgres)."""
    _check(stack, name)
    if name.startswith("nats-"):
        nats_cluster.start_node(stack, _nats(stack, name))
    elif name.startswith("redis-cluster-"):
        redis_cluster.start_node(stack, _redis(stack, name))
    else:
        postgres_ha.start_node(stack, _postgres(stack, name).n)
    stack.save()


def leaders(stack: Stack) -> dict[str, Any]:
    """Who leads what now, as each server reports it: the NATS meta leader and every stream's
    leader, the Redis primaries (by process name), the Postgres primary (None meanwhile)."""
    names(stack)
    streams = nats_cluster.stream_leaders(stack)
    primary = postgres_ha.primary(stack)
    redis_primaries = [n.name for n in redis_cluster.nodes(stack) if redis_cluster.role(n.port) == "master"]
    try:
        meta: str | None = nats_cluster.meta_leader(stack)
    except StackError:
        meta = None
    return {
        "nats": {
            "meta": _process_of(stack, meta),
            "streams": {name: _process_of(stack, server) for name, server in sorted(streams.items())},
        },
        "redis": {"primaries": redis_primaries},
        "postgres": {"primary": primary.name if primary else None},
    }


def _process_of(stack: Stack, server_name: str | None) -> str | None:
    """A NATS server name (n1..n3, as JetStream names leaders) as the stack's process name."""
    return nats_cluster.node_of_server(stack, server_name).name if server_name else None


def _check(stack: Stack, name: str) -> None:
    known = names(stack)
    if name not in known:
        raise StackError(f"no clustered node {name!r}: one of {', '.join(known)}")


def _nats(stack: Stack, name: str) -> nats_cluster.NatsNode:
    return next(n for n in nats_cluster.nodes(stack) if n.name == name)


def _redis(stack: Stack, name: str) -> redis_cluster.ClusterNode:
    return next(n for n in redis_cluster.nodes(stack) if n.name == name)


def _postgres(stack: Stack, name: str) -> postgres_ha.PostgresNode:
    return next(n for n in postgres_ha.nodes(stack) if n.name == name)
