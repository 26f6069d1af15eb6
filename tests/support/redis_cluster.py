"""The devstack's Redis Cluster for a test module: six real redis-server nodes (three primaries,
a replica each), started once per module that asks for it and stopped afterwards. A module of
its own, so a test that kills a primary changes nobody else's cluster."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from mljob_dev.devstack import redis_cluster
from mljob_dev.devstack.stack import Stack

Cluster = tuple[Stack, list[redis_cluster.ClusterNode]]


@contextmanager
def started_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    stack = Stack(Path(tmp_path_factory.mktemp("redis-cluster")))
    try:
        nodes = redis_cluster.start(stack)
        yield stack, nodes
    finally:
        stack.stop()


def primary_of(replica_port: int) -> int:
    """The port of the primary a replica follows (ROLE: slave, host, port, ...)."""
    client = redis.Redis(host="127.0.0.1", port=replica_port)
    try:
        reply = client.role()
    finally:
        client.close()
    return int(reply[2])


def scripts_cached(port: int, script: str) -> bool:
    """Whether the node at `port` has `script` in its script cache."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return bool(client.script_exists(hashlib.sha1(script.encode()).hexdigest())[0])
    finally:
        client.close()
