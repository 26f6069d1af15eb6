"""Loading a handler from `package.module:function` and calling it (sync or async)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from mljob.worker.context import TaskContext

#: A handler takes the task context and returns a JSON-serialisable result (or an awaitable of one).
Handler = Callable[[TaskContext], Any]


class HandlerLoadError(ValueError):
    """The handler spec does not name an importable callable."""


def load_handler(spec: str) -> Handler:
    """Import `package.module:function` (the attribute may be dotted: `module:Class.method`).

    The current directory is importable, as with `python -m`, so a project's own modules work.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"handler {spec!r} must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise HandlerLoadError(f"cannot import handler module {module_name!r}: {err}") from err
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as err:
            raise HandlerLoadError(f"handler {spec!r}: {module_name} has no attribute {attr!r}") from err
    if not callable(target):
        raise HandlerLoadError(f"handler {spec!r} is not callable")
    handler: Handler = target
    return handler


def is_async_handler(handler: Handler) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - callable objects with `async def __call__`
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


async def call_handler(handler: Handler, ctx: TaskContext) -> Any:
    """Run the handler: async ones on the loop, plain ones on a daemon thread (see _DaemonThreads)."""
    if is_async_handler(handler):
        result = await handler(ctx)
    else:
        result = await _run_in_daemon_thread(handler, ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


class _DaemonThreads:
    """Daemon threads for plain handlers, reused while they stay busy.

    Daemon threads rather than `asyncio.to_thread`: the default executor's threads are joined at
    interpreter exit, so a handler stuck in a long call would hold a stopping worker well past
    its grace period; an abandoned daemon thread does not. Reused rather than one per call:
    starting a thread per task was a quarter of a no-op worker's CPU. A call finds an idle thread
    or starts a new one, so a handler that never returns costs its thread, never a later task's
    turn; a thread idle for `idle_seconds` ends.
    """

    def __init__(self, idle_seconds: float = 30.0) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # idle threads not yet promised a call
        self._idle_seconds = idle_seconds

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:  # a promised call is queued before the lock is released
            if self._idle > 0:
                self._idle -= 1
                self._calls.put(call)
                return
        threading.Thread(target=self._serve, args=(call,), name="mljob-handler", daemon=True).start()

    def _serve(self, call: Callable[[], None]) -> None:
        while True:
            call()
            with self._lock:
                self._idle += 1
            while True:
                try:
                    call = self._calls.get(timeout=self._idle_seconds)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._calls.empty():  # nothing promised to an idle thread: end
                            self._idle -= 1
                            return


_THREADS = _DaemonThreads()


async def _run_in_daemon_thread(handler: Handler, ctx: TaskContext) -> Any:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: the worker stopped waiting
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def target() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = context.run(handler, ctx)
        except Exception as err:
            error = err
        except BaseException as err:  # SystemExit & co. from a handler must not stop the worker
            error = RuntimeError(f"handler raised {type(err).__name__}: {err}")
        with contextlib.suppress(RuntimeError):  # a closed loop: the worker has gone
            loop.call_soon_threadsafe(settle, value, error)

    _THREADS.submit(target)
    return await future
