"""The shared NATS connect helper: credentials and TLS passed through, one line per distinct error,
the first connection's cause named (not nats-py's "no servers"), and stop honoured mid-attempt."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

from mljob.settings import WorkerSettings
from mljob.transport import natsconn
from mljob_dev.devstack.stack import free_port

pytestmark = pytest.mark.unit
log = logging.getLogger("test.natsconn")


def test_credentials_and_tls_are_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLJOB_NATS_CREDS_FILE", "MLJOB_NATS_USER", "MLJOB_NATS_PASSWORD", "MLJOB_NATS_TLS_CA_FILE"):
        monkeypatch.delenv(var, raising=False)  # the test stack's, when `make test` exported them
    certifi = pytest.importorskip("certifi")
    settings = WorkerSettings(
        pipeline="p",
        nats_url="tls://nats.example:4222",
        nats_creds_file="/secrets/worker.creds",
        nats_user="worker",
        nats_password="s3cret",
        nats_tls_ca_file=certifi.where(),
    )
    kwargs = natsconn.options(settings, name="mljob-worker w1")
    assert kwargs["servers"] == ["tls://nats.example:4222"]
    assert kwargs["user_credentials"] == "/secrets/worker.creds"
    assert (kwargs["user"], kwargs["password"]) == ("worker", "s3cret")
    assert isinstance(kwargs["tls"], ssl.SSLContext)
    plain = natsconn.options(WorkerSettings(pipeline="p", nats_url="nats://127.0.0.1:4222"), name="n")
    assert not {"user_credentials", "user", "password", "tls"} & plain.keys()


def test_where_names_host_and_port_never_the_credentials() -> None:
    assert natsconn.where("nats://worker:s3cret@nats.example:4222") == "nats.example:4222"
    assert natsconn.where("redis://:pw@127.0.0.1:6379/0") == "127.0.0.1:6379"
    assert natsconn.where("postgresql://mljob:pw@db.example/mljob") == "db.example"
    assert natsconn.where("not a url") == "(configured address)"


def test_a_comma_separated_url_is_a_clusters_server_list() -> None:
    """A cluster's nodes in one setting: each is a server to try, and the log names them all
    (an entry without a scheme takes the first one's), never a password."""
    url = "tls://u:pw@127.0.0.1:4222, tls://127.0.0.1:4223,,127.0.0.1:4224"
    assert natsconn.servers(url) == ["tls://u:pw@127.0.0.1:4222", "tls://127.0.0.1:4223", "127.0.0.1:4224"]
    assert natsconn.where(url) == "127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224"
    settings = WorkerSettings(pipeline="p", nats_url=url)
    assert natsconn.options(settings, name="n")["servers"] == natsconn.servers(url)
    assert natsconn.servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]


async def test_error_callback_logs_each_distinct_error_once(caplog: pytest.LogCaptureFixture) -> None:
    callbacks = natsconn.ConnectionLog(log, "nats://u:p@127.0.0.1:4222")
    callbacks.connected = True
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            await callbacks.error(ConnectionResetError("reset by peer"))
        await callbacks.error(TimeoutError())
        await callbacks.reconnected()
        await callbacks.error(ConnectionResetError("reset by peer"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "NATS at 127.0.0.1:4222: ConnectionResetError: reset by peer",
        "NATS at 127.0.0.1:4222: TimeoutError",
        "NATS at 127.0.0.1:4222: ConnectionResetError: reset by peer",  # after a reconnect
    ]
    assert not any(r.exc_info for r in caplog.records)


async def test_first_connection_names_the_cause_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here
    settings = WorkerSettings(pipeline="p", nats_url=f"nats://127.0.0.1:{port}")
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger=log.name):
        task = asyncio.create_task(
            natsconn.connect(
                settings,
                name="t",
                log=log,
                report=natsconn.once_per_cause(log, "NATS unreachable"),
                stop=stop,
                reconnect_time_wait=0.1,
                initial_delay=0.1,
                max_delay=0.2,
            )
        )
        while not any("NATS unreachable" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # several more attempts, same cause
        stop.set()
        assert await asyncio.wait_for(task, 10) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert "ConnectionRefusedError" in lines[0] and str(port) in lines[0], lines
