"""The one way a test waits for something: poll a check until it holds, or fail saying what.

`wait_for` is for synchronous checks (kubectl, subprocesses, files), `eventually` for the event
loop's (its check may be a plain function or a coroutine function). Both return the first truthy
value the check gives. On timeout they raise AssertionError naming `what` and the check's last
value, or the last exception it raised (chained): a check that raises is "not yet", so a
service that is still starting may refuse a connection. A check that must stop the wait at once
(a server process that died) calls `pytest.fail`, which is not retried.

`what` may be a callable, asked only on timeout, so the message can carry what is known by then
(a worker's log, a status).

Timeouts are upper bounds for waiting, never timing assertions: a test that measures a duration
measures it itself.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["eventually", "wait_for"]

T = TypeVar("T")

#: A check polled by `wait_for` (kubectl, a subprocess) costs more than one `eventually` polls.
SYNC_INTERVAL = 0.3
ASYNC_INTERVAL = 0.05

_NOTHING = object()


def _timed_out(
    what: str | Callable[[], str], timeout: float, last: Any, error: Exception | None
) -> AssertionError:
    described = what() if callable(what) else what
    if error is not None:
        seen = f"the check last raised {type(error).__name__}: {error}"
    elif last is _NOTHING:
        seen = "the check never ran"
    else:
        seen = f"the check last gave {last!r}"
    return AssertionError(f"timed out after {timeout:g}s waiting for {described} ({seen})")


def wait_for(
    check: Callable[[], T],
    timeout: float,
    *,
    interval: float = SYNC_INTERVAL,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Poll `check` every `interval` seconds until it returns a truthy value, and return it."""
    deadline = time.monotonic() + timeout
    last: Any = _NOTHING
    error: Exception | None = None
    while True:
        try:
            last, error = check(), None
        except Exception as err:
            error = err
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, last, error) from error
        time.sleep(interval)


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    timeout: float,
    *,
    interval: float = ASYNC_INTERVAL,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Poll `check` (sync or async) every `interval` seconds until it gives a truthy value, and
    return it; the event loop runs meanwhile."""
    deadline = time.monotonic() + timeout
    last: Any = _NOTHING
    error: Exception | None = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            last, error = value, None
        except Exception as err:
            error = err
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, last, error) from error
        await asyncio.sleep(interval)
