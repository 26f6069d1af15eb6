"""The local stack's NATS speaks TLS only: a `tls://` URL with the stack's CA connects (through
the same helper as the operator, collector and worker), a client without the CA fails to verify
the certificate, and a plaintext client gets no NATS at all. Runs on a private nats-server
started by the stack's own code; a restart keeps the passwords and the certificate."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from mljob import protocol
from mljob.settings import NatsSettings
from mljob.transport import natsconn
from mljob_dev.devstack import nats_config
from mljob_dev.devstack.restart import restart
from mljob_dev.devstack.stack import Stack

log = logging.getLogger("test.nats_tls")


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="mljob-nats-tls-"))
    stack = Stack(directory=directory)
    try:
        stack.start_nats()
        stack.save()
        yield stack
    finally:
        Stack.load(directory).stop()  # a restart wrote the new PID there
        shutil.rmtree(directory, ignore_errors=True)


def settings(env: dict[str, str], ca: bool = True, url: str | None = None) -> NatsSettings:
    return NatsSettings(
        nats_url=url or env["MLJOB_NATS_URL"],
        nats_tls_ca_file=env["MLJOB_NATS_TLS_CA_FILE"] if ca else None,
        nats_user=env["MLJOB_NATS_USER"],
        nats_password=env["MLJOB_NATS_PASSWORD"],
        nats_creds_file=None,
    )


async def round_trip(target: NatsSettings, pipeline: str) -> None:
    """As the operator: a task stream, a task published into it (PubAck) and read back."""
    nc = await natsconn.connect(target, name="test-nats-tls", log=log)
    assert nc is not None
    try:
        js = nc.jetstream(timeout=5)
        stream, subject = protocol.task_stream(pipeline), protocol.task_subject(pipeline, "u1")
        await js.add_stream(
            StreamConfig(
                name=stream, subjects=[protocol.task_stream_subjects(pipeline)], storage=StorageType.FILE
            )
        )
        ack = await js.publish(subject, b"over tls")
        assert ack.stream == stream
        assert (await js.get_msg(stream, ack.seq)).data == b"over tls"
        await js.delete_stream(stream)
    finally:
        await nc.close()


def test_the_stack_exports_a_tls_url_and_three_identities(tls_stack: Stack) -> None:
    env = tls_stack.env
    assert env["MLJOB_NATS_URL"].startswith("tls://127.0.0.1:")
    assert Path(env["MLJOB_NATS_TLS_CA_FILE"]).is_file()
    assert env["MLJOB_NATS_USER"] == nats_config.OPERATOR_USER
    assert env["MLJOB_DEV_NATS_COLLECTOR_USER"] == nats_config.COLLECTOR_USER
    assert env["MLJOB_DEV_NATS_WORKER_USER"] == nats_config.WORKER_USER
    passwords = [env[f"MLJOB_{k}PASSWORD"] for k in ("NATS_", "DEV_NATS_COLLECTOR_", "DEV_NATS_WORKER_")]
    assert len(set(passwords)) == 3 and all(len(p) >= 24 for p in passwords)
    for private in (
        tls_stack.state_path,
        tls_stack.directory / "nats" / "nats.conf",
        tls_stack.directory / "nats" / "server.key",
    ):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    # `eval "$(mljob dev stack env)"` gives back exactly the values.
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1"; env -0', "-", tls_stack.export_lines()],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    )
    exported = dict(line.split("=", 1) for line in shell.stdout.split("\0") if "=" in line)
    assert {k: exported[k] for k in env} == env


async def test_tls_with_the_ca_round_trips_a_jetstream_publish(tls_stack: Stack) -> None:
    await round_trip(settings(tls_stack.env), "tls-check")


async def test_without_the_ca_the_certificate_is_refused(tls_stack: Stack) -> None:
    """natsconn's options without a CA (system CAs only): the handshake fails verification.

    Single attempt (allow_reconnect off): see the next test for why not natsconn.connect."""
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    options = natsconn.options(settings(tls_stack.env, ca=False), name="no-ca")
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        await nats.connect(**{**options, "allow_reconnect": False, "error_cb": on_error})
    assert any(isinstance(err, ssl.SSLCertVerificationError) for err in errors)


async def test_natsconn_reports_an_untrusted_certificate(tls_stack: Stack) -> None:
    stop = asyncio.Event()
    causes: list[str] = []

    def report(cause: str, delay: float) -> None:
        causes.append(cause)
        stop.set()

    asyncio.get_running_loop().call_later(4, stop.set)
    target = settings(tls_stack.env, ca=False)
    assert await natsconn.connect(target, name="no-ca", log=log, report=report, stop=stop) is None
    assert causes and "CERTIFICATE_VERIFY_FAILED" in causes[0], causes


def test_a_plaintext_client_is_refused(tls_stack: Stack) -> None:
    """The server announces TLS as required and answers a plaintext CONNECT with nothing but a
    closed connection (what a `nats://` client without TLS meets)."""
    port = int(tls_stack.env["MLJOB_NATS_URL"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        info = sock.makefile("rb").readline()
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        connect = {
            "user": tls_stack.env["MLJOB_NATS_USER"],
            "pass": tls_stack.env["MLJOB_NATS_PASSWORD"],
            "verbose": True,
        }
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert b"PONG" not in answer and b"+OK" not in answer, answer


async def test_a_restart_keeps_the_passwords_and_the_certificate(tls_stack: Stack) -> None:
    before = dict(Stack.load(tls_stack.directory).env)
    after = restart(tls_stack.directory, "nats")
    assert after.env == before
    await round_trip(settings(before), "tls-after-restart")
