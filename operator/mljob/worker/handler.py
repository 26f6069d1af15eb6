"""Loading a handler from `package.module:function` and calling it (sync or async)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import os
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
    """Run the handler: async ones on the loop, plain ones in a thread of their own.

    Plain handlers run in a daemon thread rather than `asyncio.to_thread`: the default executor's
    threads are joined at interpreter exit, so a handler stuck in a long call would hold a
    stopping worker well past its grace period. An abandoned daemon thread does not.
    """
    if is_async_handler(handler):
        result = await handler(ctx)
    else:
        result = await _run_in_daemon_thread(handler, ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


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

    threading.Thread(target=target, name=f"mljob-handler-{ctx.item_id}", daemon=True).start()
    return await future
