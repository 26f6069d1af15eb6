"""A private nats-server on the stack's NATS config (TLS, users, permissions), for tests of what
each identity may do: connections that keep the permission violations the server reports
(`Identity`), and the operator's side (`World`). The fixtures (`server`, `world`, `worker`) are
in tests/integration/conftest.py.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from mljob import protocol
from mljob.ops import permissions as nats_permissions
from mljob_dev.devstack import nats_config, tools
from mljob_dev.devstack.stack import free_port
from support.waiting import wait_for

PIPELINE, OTHER = "resize", "other"
SCOPED_WORKER = "mljob-worker-resize"
#: A test-only user that may listen to everything, to see what the others send.
SPY = "spy"
WORKERS = [nats_config.WORKER_USER, SCOPED_WORKER]


@dataclass(frozen=True)
class Server:
    config: nats_config.NatsConfig


@contextmanager
def private_server(directory: Path) -> Iterator[Server]:
    """nats-server on the stack's config in `directory`, plus a worker scoped to PIPELINE and
    the SPY; stopped (and its directory removed) afterwards."""
    port, monitor = free_port(), free_port()
    users = {
        **nats_config.STACK_USERS,
        SCOPED_WORKER: nats_permissions.worker(PIPELINE),
        SPY: nats_permissions.Permissions(publish_allow=("spy",), publish_deny=(), subscribe_allow=(">",)),
    }
    config = nats_config.write(directory / "nats", port, monitor, directory / "jetstream", users)
    log = open(directory / "nats-server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(config.command(tools.ensure("nats-server")), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(monitor, proc)
        yield Server(config)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def wait_healthy(monitor: int, proc: subprocess.Popen[bytes]) -> None:
    """Until the server's JetStream is up; a server that exits fails the wait at once."""
    url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail("nats-server exited; see its log")
        with urllib.request.urlopen(url, timeout=1) as resp:
            return b"ok" in resp.read()

    wait_for(healthy, 30, interval=0.1, what="the private nats-server to be healthy")


@dataclass
class Identity:
    """A connection as one user that keeps the permission violations the server reports."""

    nc: Client
    violations: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=2)

    async def on_error(self, err: Exception) -> None:
        if isinstance(err, NatsError) and "permissions violation" in str(err).lower():
            self.violations.append(str(err))
            self.arrived.set()

    def saw(self, kind: str, subject: str) -> bool:
        needle = f'permissions violation for {kind} to "{subject}"'.lower()
        return any(needle in v.lower() for v in self.violations)

    async def refused(
        self, subject: str, op: Callable[[], Awaitable[object]], kind: str = "publish", request: bool = True
    ) -> None:
        """Run `op` and require the server's violation for `subject`; a `request` must also go
        unanswered (a core publish returns at once: callers check the state it would change)."""
        self.violations.clear()
        task = asyncio.ensure_future(op())
        try:
            async with asyncio.timeout(5):
                while not self.saw(kind, subject):
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            pytest.fail(f"no permissions violation for {kind} to {subject!r}; seen: {self.violations}")
        finally:
            if request and task.done() and not task.cancelled() and task.exception() is None:
                pytest.fail(f"{subject}: the server reported a violation, yet the operation succeeded")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def clean(self) -> None:
        """No violation so far (a PING round trip: an -ERR comes before the PONG)."""
        await self.nc.flush(timeout=5)
        assert not self.violations, self.violations


async def connect(server: Server, user: str, password: str | None = None) -> Identity:
    identity = Identity(nc=Client())
    await identity.nc.connect(
        servers=[server.config.url],
        user=user,
        password=server.config.passwords[user] if password is None else password,
        tls=ssl.create_default_context(cafile=str(server.config.ca_cert)),
        error_cb=identity.on_error,
        allow_reconnect=False,
        connect_timeout=5,
    )
    return identity


@dataclass(frozen=True)
class World:
    """The operator's side: the shared streams, and a job (consumer, tasks, registry key) per call."""

    operator: Identity

    async def job(self, pipeline: str, tasks: int = 2, max_deliver: int = 5) -> str:
        uid = str(uuid.uuid4())
        js, stream = self.operator.js, protocol.task_stream(pipeline)
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[protocol.task_stream_subjects(pipeline)],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        subject = protocol.task_subject(pipeline, uid)
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=protocol.task_consumer(uid),
                ack_policy=AckPolicy.EXPLICIT,
                max_deliver=max_deliver,
                ack_wait=30,
                filter_subject=subject,
            ),
        )
        for n in range(tasks):
            task = protocol.Task(
                job=protocol.JobRef(uid=uid, namespace="ns", name="job", pipeline=pipeline),
                item={"id": f"item-{n}"},
            )
            headers = {protocol.MSG_ID_HEADER: protocol.task_msg_id(uid, f"item-{n}")}
            await js.publish(subject, task.encode(), headers=headers)
        entry = protocol.RegistryEntry(
            uid=uid,
            namespace="ns",
            name="job",
            pipeline=pipeline,
            stream=stream,
            consumer=protocol.task_consumer(uid),
            subject=subject,
            created=protocol.utcnow(),
        )
        kv = await js.key_value(protocol.REGISTRY_BUCKET)
        await kv.put(protocol.registry_key(pipeline, uid), entry.encode())
        return uid

    async def count(self, stream: str) -> int:
        return int((await self.operator.js.stream_info(stream)).state.messages)


@asynccontextmanager
async def opened_world(server: Server) -> AsyncIterator[World]:
    """The operator's side of `server`: the registry bucket and the results stream and durable;
    the operator must have seen no violation by the end."""
    operator = await connect(server, nats_config.OPERATOR_USER)
    js = operator.js
    await js.create_key_value(KeyValueConfig(bucket=protocol.REGISTRY_BUCKET, history=1))
    await js.add_stream(
        StreamConfig(
            name=protocol.RESULTS_STREAM,
            subjects=[f"{protocol.RESULTS_SUBJECT_PREFIX}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        protocol.RESULTS_STREAM,
        ConsumerConfig(durable_name=protocol.RESULTS_CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
    )
    try:
        yield World(operator)
        await operator.clean()
    finally:
        await operator.nc.close()
