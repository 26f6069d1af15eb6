"""The local stack's Redis Cluster (issue 15's clustered stack, its first part): six real
redis-server nodes joined by `redis-cli --cluster create`. A job's keys share one slot through
their `{uid}` hash tag; a single-node client is sent elsewhere (MOVED) for a key on another
primary, which is why the operator will need the cluster client; a killed primary's replica
takes over with the data it had replicated."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from mljob_dev.devstack import redis_cluster
from support.redis_cluster import Cluster, started_cluster
from support.waiting import wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started_cluster(tmp_path_factory) as started:
        yield started


@pytest.fixture
def client(cluster: Cluster) -> Iterator[RedisCluster]:
    """A cluster client that finds the nodes from the stack's one address."""
    stack, _ = cluster
    opened = RedisCluster.from_url(stack.env["MLJOB_REDIS_CLUSTER_URL"])
    yield opened
    opened.close()


def test_three_primaries_with_a_replica_each_cover_every_slot(
    cluster: Cluster,
) -> None:
    stack, nodes = cluster
    info = redis_cluster.cluster_info(nodes[0].port)
    assert (info["cluster_state"], info["cluster_slots_assigned"], info["cluster_size"]) == (
        "ok",
        "16384",
        "3",
    )
    assert sorted(redis_cluster.role(n.port) for n in nodes) == ["master"] * 3 + ["slave"] * 3
    assert stack.env["MLJOB_REDIS_CLUSTER_URL"] == f"redis://127.0.0.1:{nodes[0].port}/0"


def test_a_jobs_keys_share_a_slot_and_a_single_node_client_is_moved(
    cluster: Cluster, client: RedisCluster
) -> None:
    _, nodes = cluster
    keys = [f"mljob:{{job-{i}}}:{part}" for i in range(20) for part in ("pending", "failed", "meta")]
    slots = {key: client.keyslot(key) for key in keys}
    for i in range(20):
        assert len({slots[k] for k in keys if f"{{job-{i}}}" in k}) == 1
    assert len(set(slots.values())) > 3, "twenty jobs spread over the cluster's slots"
    primaries = [n for n in nodes if redis_cluster.role(n.port) == "master"]
    owners = {client.get_node_from_key(key).port for key in keys}
    assert owners == {n.port for n in primaries}
    foreign = next(k for k in keys if client.get_node_from_key(k).port != primaries[0].port)
    single = redis.Redis(host="127.0.0.1", port=primaries[0].port)
    with pytest.raises(redis.exceptions.MovedError):
        single.set(foreign, "x")
    single.close()


def test_a_killed_primarys_replica_takes_over_with_the_replicated_data(
    cluster: Cluster, client: RedisCluster
) -> None:
    stack, nodes = cluster
    key = "mljob:{failover}:pending"
    client.sadd(key, "a", "b", "c")
    owner = client.get_node_from_key(key)
    assert client.execute_command("WAIT", 1, 5000, target_nodes=owner) == 1  # on its replica
    victim = next(n for n in nodes if n.port == owner.port)
    redis_cluster.kill(stack, victim)
    survivors = [n for n in nodes if n is not victim]
    wait_for(
        lambda: (
            [redis_cluster.role(n.port) for n in survivors].count("master") == 3
            and redis_cluster.cluster_info(survivors[0].port).get("cluster_state") == "ok"
        ),
        30,
        what="the replica to be promoted and the cluster to be ok again",
    )
    after = RedisCluster.from_url(f"redis://127.0.0.1:{survivors[0].port}/0")
    try:
        assert after.smembers(key) == {b"a", b"b", b"c"}
        assert after.get_node_from_key(key).port != victim.port
    finally:
        after.close()
