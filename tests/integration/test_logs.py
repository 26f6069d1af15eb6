"""The processes' logging setup drops asyncio's TLS-teardown warning, and nothing else.

asyncio's sslproto logs "returning true from eof_received() has no effect when using ssl" when a
TLS peer closes a connection whose protocol asked to stay half-open, as nats-py's does: every
TLS connection to NATS said it once on closing, in `make demo`'s output too.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from mljob.ops import logs
from support.harness import ROOT, child_env, mljob_cmd
from support.stack import StackEnv

NOISE = "returning true from eof_received() has no effect when using ssl"


@pytest.mark.unit
def test_the_tls_teardown_warning_is_dropped_and_other_asyncio_warnings_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logs.drop_noise()
    logs.drop_noise()  # idempotent: one filter
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("asyncio").warning(NOISE)
        logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Task x>", 0.25)
        logging.getLogger("asyncio").warning("returning true from eof_received() is odd")
        logging.getLogger("mljob.other").warning(NOISE)  # the same words from another logger
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("asyncio", "Executing <Task x> took 0.250 seconds"),
        ("asyncio", "returning true from eof_received() is odd"),
        ("mljob.other", NOISE),
    ]
    assert sum(isinstance(f, logs.DropNoise) for f in logging.getLogger("asyncio").filters) == 1


#: A process that opens a TLS connection to NATS as the operator does, closes it, then logs
#: another asyncio warning; argv[1] says whether it sets its logging up as the processes do.
CLOSE_TLS_CONNECTION = """
import asyncio, logging, sys
import nats
from mljob.ops import logs
from mljob.transport import natsconn
from mljob.settings import NatsSettings

if sys.argv[1] == "setup":
    logs.setup("INFO")

async def main() -> None:
    nc = await nats.connect(**natsconn.options(NatsSettings(), name="test-tls-teardown"))
    await nc.jetstream().account_info()
    await nc.close()
    logging.getLogger("asyncio").warning("another asyncio warning")

asyncio.run(main())
"""


def close_tls_connection(stack: StackEnv, mode: str) -> str:
    env = child_env(stack.as_env("operator"))
    assert env["MLJOB_NATS_URL"].startswith("tls://")
    done = subprocess.run(
        [sys.executable, "-c", CLOSE_TLS_CONNECTION, mode],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_closing_a_tls_nats_connection_prints_no_asyncio_warning(stack: StackEnv) -> None:
    bare = close_tls_connection(stack, "bare")
    assert NOISE in bare, f"nats-py no longer provokes the warning; the filter may go:\n{bare}"
    stderr = close_tls_connection(stack, "setup")
    assert NOISE not in stderr, stderr
    assert "another asyncio warning" in stderr, stderr


def test_mljob_chaos_list_orphans_prints_no_asyncio_warning(stack: StackEnv, pg_schema: str) -> None:
    """The command `make demo` runs at its end, where the warning was on the user's screen."""
    env = child_env(stack.as_env("operator"), MLJOB_POSTGRES_SCHEMA=pg_schema)
    done = subprocess.run(
        mljob_cmd("chaos", "list-orphans", "--grace", "0"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert NOISE not in done.stderr, done.stderr
