"""An external `mljob collector` started before any operator creates the shared results stream
itself: with MLJOB_STREAM_REPLICAS, not 1 whatever the setting says (issue 7's bug).

Runs on a private single-node nats-server (the results stream is shared, so the session's NATS
already has one): there, 3 replicas cannot be placed, and the collector must say so and keep
the stream uncreated rather than quietly make a 1-replica stream.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from mljob import protocol
from mljob_dev.devstack.stack import Stack
from support.harness import Proc, child_env, connect_nats, mljob_cmd, nats_identity
from support.stack import StackEnv
from support.waiting import wait_for


@pytest.fixture(scope="module")
def private_nats() -> Iterator[dict[str, str]]:
    """A NATS of this module's own: its environment (URL, CA, identities)."""
    directory = Path(tempfile.mkdtemp(prefix="mljob-replicas-"))
    stack = Stack(directory=directory)
    try:
        stack.start_nats()
        yield dict(stack.env)
    finally:
        stack.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def _results_stream_replicas(nats_env: dict[str, str]) -> int | None:
    nc = await connect_nats(nats_env)
    try:
        info = await nc.jetstream().stream_info(protocol.RESULTS_STREAM)
        return int(info.config.num_replicas or 1)
    except NotFoundError:
        return None
    finally:
        await nc.close()


def results_stream_replicas(nats_env: dict[str, str]) -> int | None:
    return asyncio.run(_results_stream_replicas(nats_env))


def run_collector(
    stack: StackEnv, nats_env: dict[str, str], pg_schema: str, replicas: str, tmp_path: Path
) -> Proc:
    env = child_env(
        {**stack.as_env("collector"), **nats_identity(nats_env, "collector")},
        MLJOB_STREAM_REPLICAS=replicas,
        MLJOB_POSTGRES_SCHEMA=pg_schema,
    )
    return Proc(f"collector-r{replicas}", mljob_cmd("collector"), env, tmp_path)


def test_collector_first_uses_configured_replicas(
    stack: StackEnv, private_nats: dict[str, str], pg_schema: str, tmp_path: Path
) -> None:
    refused = run_collector(stack, private_nats, pg_schema, "3", tmp_path)
    try:
        needle = "cannot set up the results stream"
        line = wait_for(
            lambda: next((x for x in refused.log_tail(200).splitlines() if needle in x), None),
            60,
            what="the collector naming the results stream it cannot create",
        )
        assert "MLJOB_STREAM_REPLICAS=3" in line, line
        assert "replicas" in line.split("(", 2)[-1].lower(), line  # the server's reason is quoted
        assert refused.alive(), refused.log_tail()
        assert "collector running" not in refused.log_tail(200)
        assert results_stream_replicas(private_nats) is None  # not created with 1 replica instead
    finally:
        assert refused.stop() == 0, refused.log_tail()
    assert "Traceback" not in refused.log_tail(400)

    accepted = run_collector(stack, private_nats, pg_schema, "1", tmp_path)
    try:
        wait_for(lambda: "collector running" in accepted.log_tail(200), 60, what="the collector running")
        assert results_stream_replicas(private_nats) == 1
    finally:
        assert accepted.stop() == 0, accepted.log_tail()
