"""The local stack's NATS JetStream cluster (issue 15's clustered stack): three real nats-server
nodes with routes to each other, TLS and the stack's per-role users. An R3 task stream made with
the operator's identity over the comma-separated URL list; its leader SIGKILLed while the client
is connected to it: another node leads, the client reconnects to a survivor and acknowledged
publishes go on; the killed node comes back on its ports and store and catches up."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from mljob import protocol
from mljob.adapters import jetstream
from mljob.transport import natsconn
from mljob_dev.devstack import nats_cluster, nats_config
from mljob_dev.devstack.stack import Stack
from support.waiting import eventually, wait_for

log = logging.getLogger("test.nats_cluster")
PIPELINE = "clustered"
UID = "0c0ffee0-0000-4000-8000-00000000c1a5"


@dataclass(frozen=True)
class Secret:
    value: str

    def get_secret_value(self) -> str:
        return self.value


@dataclass(frozen=True)
class Target:
    """natsconn's settings from a role's variables (nats_config.role_env)."""

    nats_url: str
    nats_user: str | None
    nats_password: Secret | None
    nats_tls_ca_file: str | None
    nats_creds_file: str | None = None

    @classmethod
    def of(cls, env: dict[str, str], role: str = "operator") -> Target:
        found = nats_config.role_env(env, role)
        return cls(
            nats_url=found["MLJOB_NATS_URL"],
            nats_user=found["MLJOB_NATS_USER"],
            nats_password=Secret(found["MLJOB_NATS_PASSWORD"]),
            nats_tls_ca_file=found["MLJOB_NATS_TLS_CA_FILE"],
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(Path(tmp_path_factory.mktemp("nats-cluster")))
    try:
        nats_cluster.start(stack)
        yield stack
    finally:
        stack.stop()


async def _connect(stack: Stack, role: str = "operator") -> Client:
    nc = await natsconn.connect(
        Target.of(stack.env, role), name=f"test-{role}", log=log, connect_timeout=5, reconnect_time_wait=0.3
    )
    assert nc is not None
    return nc


def test_three_nodes_form_one_jetstream_cluster(cluster: Stack) -> None:
    nodes = nats_cluster.nodes(cluster)
    assert [n.server_name for n in nodes] == ["n1", "n2", "n3"]
    assert cluster.env["MLJOB_NATS_URL"] == ",".join(f"tls://127.0.0.1:{n.port}" for n in nodes)
    assert cluster.env["MLJOB_NATS_MONITOR_URL"] == nodes[0].monitor_url
    assert natsconn.where(cluster.env["MLJOB_NATS_URL"]) == ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    leader = nats_cluster.meta_leader(cluster)
    meta = (nats_cluster.jsz(nats_cluster.node_of_server(cluster, leader)) or {})["meta_cluster"]
    assert meta["cluster_size"] == 3
    assert sorted([leader, *(p["name"] for p in meta["replicas"])]) == ["n1", "n2", "n3"]
    assert all(nats_cluster.healthy(n) for n in nodes)


async def _publish(js: JetStreamContext, i: int, deadline: float) -> None:
    """One acknowledged task publish, retried (same message id: stored once) until `deadline`."""
    subject = protocol.task_subject(PIPELINE, UID)
    while True:
        try:
            await js.publish(subject, b"{}", timeout=2, headers={"Nats-Msg-Id": f"{UID}-{i}"})
            return
        except Exception:
            if time.monotonic() > deadline:
                raise


def _port(nc: Client) -> int:
    """The client port of the node `nc` is connected to."""
    assert nc.connected_url is not None and nc.connected_url.port is not None
    return nc.connected_url.port


async def test_the_stream_leaders_loss_elects_another_and_the_killed_node_catches_up(cluster: Stack) -> None:
    nc = await _connect(cluster)
    admin = await _connect(cluster, "admin")
    try:
        js = nc.jetstream()
        stream = await jetstream.ensure_pipeline_stream(js, PIPELINE, replicas=3)
        info = await js.stream_info(stream)
        assert info.config.num_replicas == 3 and info.cluster is not None
        for i in range(20):
            await _publish(js, i, time.monotonic() + 10)
        # The leader is the node this client talks to, so its loss is a reconnect too.
        here = next(n for n in nats_cluster.nodes(cluster) if n.port == _port(nc))
        if nats_cluster.stream_leader(cluster, stream) != here.server_name:
            request = {"placement": {"preferred": here.server_name}}
            await admin.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", json.dumps(request).encode(), 5)
        wait_for(
            lambda: nats_cluster.stream_leader(cluster, stream) == here.server_name,
            20,
            what=f"{here.server_name} to lead {stream}",
        )
        reconnects = nc.stats["reconnects"]
        killed_at = time.monotonic()
        nats_cluster.kill(cluster, here)
        for i in range(20, 60):
            await _publish(js, i, killed_at + 30)
        assert nc.stats["reconnects"] > reconnects
        assert _port(nc) != here.port
        info = await js.stream_info(stream)
        assert info.cluster is not None and info.cluster.leader not in (None, here.server_name)
        assert info.state.messages == 60

        nats_cluster.start_node(cluster, here)

        def caught_up() -> bool:
            report = nats_cluster.jsz(here, accounts="true", streams="true") or {}
            details = [s for a in report.get("account_details") or [] for s in a.get("stream_detail") or []]
            return any(s["name"] == stream and s["state"]["messages"] == 60 for s in details)

        wait_for(caught_up, 30, what=f"{here.server_name} to hold the stream's 60 messages again")

        async def all_current() -> bool:
            replicas = (await js.stream_info(stream)).cluster.replicas or []  # type: ignore[union-attr]
            return len(replicas) == 2 and all(r.current and not r.offline for r in replicas)

        await eventually(all_current, 30, what="every replica current")
    finally:
        await admin.close()
        await nc.close()


async def test_a_replicated_task_stream_gives_each_job_a_one_replica_consumer(cluster: Stack) -> None:
    """Issue 15's consumer design: an R3 task stream is created with limits retention and each
    job's consumer at one replica (no RAFT group per MLJob). Tasks are delivered, ACKed and
    stay stored until the job's cleanup purges them; a work-queue stream made at R3 before
    keeps its rule (its consumers at the stream's count, the only one NATS accepts)."""
    from nats.js.api import RetentionPolicy, StreamConfig

    nc = await _connect(cluster)
    admin = await _connect(cluster, "admin")
    try:
        js = nc.jetstream()
        uid = "0c0ffee0-0000-4000-8000-0000000000a1"
        settings = jetstream.JobStreamSettings(
            uid=uid, namespace="ns", name="r1", pipeline="clustered-r1", replicas=3
        )
        entry = await jetstream.ensure_job_stream(js, settings)
        stream = await js.stream_info(entry.stream)
        assert (stream.config.retention, stream.config.num_replicas) == (RetentionPolicy.LIMITS, 3)
        consumer = await js.consumer_info(entry.stream, entry.consumer)
        assert consumer.config.num_replicas == 1
        assert consumer.cluster is not None and not consumer.cluster.replicas  # one server holds it

        for i in range(10):
            await js.publish(entry.subject, b"{}", timeout=5, headers={"Nats-Msg-Id": f"{uid}:{i}"})
        worker = await _connect(cluster, "worker")
        try:
            sub = await worker.jetstream().pull_subscribe_bind(entry.consumer, entry.stream)
            got = await sub.fetch(10, timeout=5)
            for msg in got:
                await msg.ack_sync()
        finally:
            await worker.close()
        assert len(got) == 10
        info = await js.consumer_info(entry.stream, entry.consumer)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        assert await jetstream.job_task_count(js, "clustered-r1", uid) == 10  # kept until cleanup
        assert await jetstream.delete_job_tasks(js, "clustered-r1", uid)
        assert await jetstream.job_task_count(js, "clustered-r1", uid) == 0

        old = protocol.task_stream("clustered-wq")
        await admin.jetstream().add_stream(
            StreamConfig(
                name=old,
                subjects=[protocol.task_stream_subjects("clustered-wq")],
                retention=RetentionPolicy.WORK_QUEUE,
                num_replicas=3,
            )
        )
        wq = jetstream.JobStreamSettings(
            uid=uid, namespace="ns", name="wq", pipeline="clustered-wq", replicas=3
        )
        entry = await jetstream.ensure_job_stream(js, wq)
        consumer = await js.consumer_info(entry.stream, entry.consumer)
        assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2
    finally:
        await admin.close()
        await nc.close()
