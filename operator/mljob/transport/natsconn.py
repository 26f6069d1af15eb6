"""One way to connect to NATS, for the operator, the collector and the worker (and the retry they share).

The first connection is retried with backoff, one log line per failure naming NATS and where it
was looked for, never a traceback; once connected, nats-py reconnects forever and its error
callback logs one line per distinct error. A failure that retrying cannot heal (NATS refusing the
credentials; for the other stores, what their `permanent` classifier names) ends the retry with
`CannotStart`, whose one line the entry points print before exiting non-zero. Credentials
files, user/password and a CA for `tls://` URLs come from the settings. Imports only nats-py
and the standard library, so a worker-only install has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, overload
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client
from nats.errors import AuthorizationError, NoServersError

T = TypeVar("T")

#: Called after each failed attempt with the cause (one line) and the delay before the next one.
Report = Callable[[str, float], None]
#: For a failure that retrying cannot heal: what failed, its cause and what to fix (one line);
#: None for a failure that may pass.
Permanent = Callable[[BaseException], str | None]


class CannotStart(Exception):
    """Start-up met a failure that retrying cannot heal (wrong credentials, a failed migration).

    Its message is the one line to print (`cannot start: <what> (<cause>): <what to fix>`): the
    process exits non-zero instead of retrying forever what only a changed setting can fix.
    """


def nats_refused(where: str) -> Permanent:
    """NATS refusing the identity: the same credentials will be refused again."""

    def check(err: BaseException) -> str | None:
        if isinstance(err, AuthorizationError) or "authorization violation" in str(err).lower():
            return (
                f"NATS at {where} refused the credentials ({cause(err)}): check MLJOB_NATS_USER and "
                "MLJOB_NATS_PASSWORD (or MLJOB_NATS_CREDS_FILE)"
            )
        return None

    return check


class Secret(Protocol):
    def get_secret_value(self) -> str: ...


class NatsTarget(Protocol):
    """The settings a NATS connection needs (mljob.settings.NatsSettings has them)."""

    @property
    def nats_url(self) -> str: ...
    @property
    def nats_creds_file(self) -> str | None: ...
    @property
    def nats_user(self) -> str | None: ...
    @property
    def nats_password(self) -> Secret | None: ...
    @property
    def nats_tls_ca_file(self) -> str | None: ...


def cause(err: BaseException) -> str:
    """`Type: first line of the message`: enough to tell causes apart, short enough for one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def servers(url: str) -> list[str]:
    """The server list of a NATS URL setting: one URL, or a cluster's comma-separated ones
    (spaces around each trimmed, empty entries dropped)."""
    found = [part.strip() for part in url.split(",")]
    return [part for part in found if part] or [url.strip()]


def where(url: str) -> str:
    """host:port of a URL or DSN, never its credentials: the address a log line names. A
    comma-separated list (a NATS cluster, a multi-host DSN) names each of its addresses,
    comma-separated; an entry without a scheme takes the first one's."""
    if "," in url:
        first, *rest = servers(url)
        scheme = first.split("://", 1)[0] if "://" in first else ""
        return ",".join(
            where(part if "://" in part or not scheme else f"{scheme}://{part}") for part in (first, *rest)
        )
    try:
        parts = urlsplit(url)
        if parts.hostname:
            return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    except ValueError:
        pass
    return "(configured address)"


def once_per_cause(log: logging.Logger, what: str) -> Report:
    """Report a failure once while its cause stays the same: `<what> (<cause>); retrying`."""
    last: list[str] = []

    def report(line: str, delay: float) -> None:
        if last != [line]:
            log.warning("%s (%s); retrying", what, line)
            last[:] = [line]

    return report


@overload
async def retry(
    attempt: Callable[[], Awaitable[T]],
    report: Report,
    *,
    stop: None = None,
    initial: float = ...,
    maximum: float = ...,
    permanent: Permanent | None = ...,
) -> T: ...


@overload
async def retry(
    attempt: Callable[[], Awaitable[T]],
    report: Report,
    *,
    stop: asyncio.Event,
    initial: float = ...,
    maximum: float = ...,
    permanent: Permanent | None = ...,
) -> T | None: ...


async def retry(
    attempt: Callable[[], Awaitable[T]],
    report: Report,
    *,
    stop: asyncio.Event | None = None,
    initial: float = 0.5,
    maximum: float = 10.0,
    permanent: Permanent | None = None,
) -> T | None:
    """Run `attempt` until it succeeds (its value) or `stop` is set (None), backing off.

    Raises CannotStart at once for a failure `permanent` names (retrying cannot heal it).
    """
    delay = initial
    while stop is None or not stop.is_set():
        try:
            return await attempt() if stop is None else await _unless_stopped(attempt(), stop)
        except _Stopped:
            return None
        except Exception as err:
            fix = permanent(err) if permanent is not None else None
            if fix is not None:
                raise CannotStart(f"cannot start: {fix}") from err
            report(cause(err), delay)
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, maximum)
    return None


class _Stopped(Exception):
    """`stop` was set while an attempt was under way (the attempt was cancelled)."""


async def _unless_stopped(coro: Awaitable[T], stop: asyncio.Event) -> T:
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _Stopped


class ConnectionLog:
    """nats-py's callbacks once connected: one line per distinct error, no traceback.

    Errors of the first connection are left to `retry`'s report (one line per attempt).
    """

    def __init__(self, log: logging.Logger, url: str, stop: asyncio.Event | None = None) -> None:
        self.log = log
        self.where = where(url)
        self.stop = stop
        self.connected = False
        self.seen: set[str] = set()
        #: The last error of the connection attempt under way (nats-py reports only "no servers").
        self.attempt_error: Exception | None = None

    async def error(self, err: Exception) -> None:
        if not self.connected:
            self.attempt_error = err
        line = cause(err)
        if self.connected and line not in self.seen:
            self.seen.add(line)
            self.log.warning("NATS at %s: %s", self.where, line)

    async def disconnected(self) -> None:
        if self.connected and not (self.stop is not None and self.stop.is_set()):
            self.log.warning("NATS disconnected from %s; reconnecting", self.where)

    async def reconnected(self) -> None:
        self.seen.clear()
        self.log.info("NATS reconnected to %s", self.where)


def options(
    settings: NatsTarget,
    *,
    name: str,
    callbacks: ConnectionLog | None = None,
    connect_timeout: float = 3.0,
    reconnect_time_wait: float = 1.0,
) -> dict[str, Any]:
    """Keyword arguments of `nats.connect` for one attempt, which raises its own cause.

    A comma-separated `nats_url` is the server list (a cluster): the first connection tries
    each in turn, and a reconnect goes to any of them (or those the servers announce).

    Reconnecting is off for the first connection: nats-py would retry it silently (forever with
    `-1`, deaf to a stop request), and after a failed TLS handshake it hangs closing the socket
    instead of reporting a certificate it cannot verify. `connect` turns reconnecting on, for
    good, once a connection made it.
    """
    kwargs: dict[str, Any] = {
        "servers": servers(settings.nats_url),
        "name": name,
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": reconnect_time_wait,
        "connect_timeout": connect_timeout,
    }
    if callbacks is not None:
        kwargs.update(
            error_cb=callbacks.error,
            disconnected_cb=callbacks.disconnected,
            reconnected_cb=callbacks.reconnected,
        )
    else:  # nats-py logs a traceback for errors nobody handles
        kwargs["error_cb"] = _ignore
    if settings.nats_creds_file:
        kwargs["user_credentials"] = settings.nats_creds_file
    if settings.nats_user:
        kwargs["user"] = settings.nats_user
    if settings.nats_password is not None:
        kwargs["password"] = settings.nats_password.get_secret_value()
    if settings.nats_tls_ca_file:
        kwargs["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca_file)
    return kwargs


async def _ignore(err: Exception) -> None:
    return None


async def connect(
    settings: NatsTarget,
    *,
    name: str,
    log: logging.Logger,
    report: Report | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[Client], Awaitable[object]] | None = None,
    connect_timeout: float = 3.0,
    reconnect_time_wait: float = 1.0,
    initial_delay: float = 0.5,
    max_delay: float = 10.0,
) -> Client | None:
    """Connect (retrying until it works or `stop` is set: then None), then reconnect forever.

    `ready` runs on each new connection before it counts (e.g. a JetStream check); if it fails
    the connection is closed and the attempt retried. The default report names NATS at its
    address once per distinct cause. Refused credentials raise CannotStart.
    """
    callbacks = ConnectionLog(log, settings.nats_url, stop)
    report = report or once_per_cause(log, f"cannot reach NATS at {where(settings.nats_url)}")

    async def attempt() -> Client:
        callbacks.attempt_error = None
        kwargs = options(
            settings,
            name=name,
            callbacks=callbacks,
            connect_timeout=connect_timeout,
            reconnect_time_wait=reconnect_time_wait,
        )
        try:
            nc = await nats.connect(**kwargs)
        except NoServersError:
            if callbacks.attempt_error is not None:  # the cause, not nats-py's summary of it
                raise callbacks.attempt_error from None
            raise
        try:
            if ready is not None:
                await ready(nc)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        callbacks.connected = True
        nc.options["allow_reconnect"] = True  # both read by nats-py on each disconnect
        nc.options["max_reconnect_attempts"] = -1
        return nc

    return await retry(
        attempt,
        report,
        stop=stop,
        initial=initial_delay,
        maximum=max_delay,
        permanent=nats_refused(where(settings.nats_url)),
    )
