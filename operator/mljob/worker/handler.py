"""Loading a handler from `package.module:function`, calling it (sync or async), batch handlers."""

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
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from mljob.worker.context import TaskContext

#: A handler takes the task context and returns a JSON-serialisable result (or an awaitable of one);
#: a batch handler (see `batch_handler`) takes a list of them and returns one outcome per task.
Handler = Callable[[TaskContext], Any]
BatchHandler = Callable[[list[TaskContext]], Any]
F = TypeVar("F", bound=Callable[..., Any])

#: A batch handler's batch size and filling wait when neither its decorator nor the worker's
#: settings (MLJOB_WORKER_BATCH_SIZE, MLJOB_WORKER_BATCH_WAIT_SECONDS) say otherwise.
DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_SECONDS = 0.05
_BATCH_MARK = "__mljob_batch__"


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """What a batch handler declared: at most `max_size` tasks per call, `max_wait` seconds to fill one."""

    max_size: int | None = None
    max_wait: float | None = None

    def __post_init__(self) -> None:
        if self.max_size is not None and (not isinstance(self.max_size, int) or self.max_size < 1):
            raise ValueError(f"batch_handler: max_size must be a positive integer, got {self.max_size!r}")
        if self.max_wait is not None and not self.max_wait >= 0:
            raise ValueError(f"batch_handler: max_wait must be 0 or more seconds, got {self.max_wait!r}")

    def resolved(self, size: int | None, wait: float | None) -> tuple[int, float]:
        """(batch size, filling wait): the worker's settings when given, else the decorator's, else
        the defaults. The settings win so a deployment can tune a handler without editing it."""
        max_size = size if size is not None else self.max_size
        max_wait = wait if wait is not None else self.max_wait
        return (
            max_size if max_size is not None else DEFAULT_BATCH_SIZE,
            max_wait if max_wait is not None else DEFAULT_BATCH_WAIT_SECONDS,
        )


@overload
def batch_handler(fn: F, /) -> F: ...


@overload
def batch_handler(*, max_size: int | None = None, max_wait: float | None = None) -> Callable[[F], F]: ...


def batch_handler(
    fn: F | None = None, /, *, max_size: int | None = None, max_wait: float | None = None
) -> F | Callable[[F], F]:
    """Mark a function as a batch handler: `@batch_handler` or `@batch_handler(max_size=32, max_wait=0.05)`.

    It receives a list of up to `max_size` `TaskContext`s, all of one job, and returns a list of
    the same length, in the same order: per task a JSON-serialisable value, or an exception
    instance for that task alone (`PermanentError("why")`: the item fails now; any other
    exception: the task is retried as if a plain handler had raised it). An exception raised by
    the call itself applies to every task of the batch.
    """
    spec = BatchSpec(max_size, max_wait)

    def mark(target: F) -> F:
        if not callable(target):
            raise TypeError("batch_handler decorates a function or a callable object")
        setattr(target, _BATCH_MARK, spec)
        return target

    return mark(fn) if fn is not None else mark


def batch_spec(handler: Callable[..., Any]) -> BatchSpec | None:
    """The handler's BatchSpec when it is a batch handler, else None (a plain per-task handler)."""
    spec = getattr(handler, _BATCH_MARK, None)
    return spec if isinstance(spec, BatchSpec) else None


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


def is_async_handler(handler: Callable[..., Any]) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - callable objects with `async def __call__`
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


async def call_handler(handler: Callable[[Any], Any], arg: Any) -> Any:
    """Run the handler on its argument (a TaskContext, or a batch handler's list of them): async
    ones on the loop, plain ones on a daemon thread (see _DaemonThreads)."""
    if is_async_handler(handler):
        result = await handler(arg)
    else:
        result = await _run_in_daemon_thread(handler, arg)
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


async def _run_in_daemon_thread(handler: Callable[[Any], Any], arg: Any) -> Any:
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
            value = context.run(handler, arg)
        except Exception as err:
            error = err
        except BaseException as err:  # SystemExit & co. from a handler must not stop the worker
            error = RuntimeError(f"handler raised {type(err).__name__}: {err}")
        with contextlib.suppress(RuntimeError):  # a closed loop: the worker has gone
            loop.call_soon_threadsafe(settle, value, error)

    _THREADS.submit(target)
    return await future
