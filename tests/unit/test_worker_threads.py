"""The worker's daemon threads for plain handlers: reused, never queued behind a stuck call."""

from __future__ import annotations

import threading
import time

import pytest

from mljob.worker.handler import _DaemonThreads
from support.waiting import wait_for

pytestmark = pytest.mark.unit


def run(threads: _DaemonThreads, call: object) -> threading.Event:
    """Submit `call` and return an event set when it has run (with its thread's ident)."""
    done = threading.Event()

    def wrapped() -> None:
        call()  # type: ignore[operator]
        done.set()

    threads.submit(wrapped)
    return done


def test_sequential_calls_reuse_one_daemon_thread() -> None:
    threads = _DaemonThreads(idle_seconds=5)
    seen: list[tuple[int, bool]] = []
    for _ in range(20):
        call = run(threads, lambda: seen.append((threading.get_ident(), threading.current_thread().daemon)))
        assert call.wait(5)
        # the thread goes idle just after the call returned
        wait_for(lambda: threads._idle, 5, interval=0.001, what="the thread to go idle")
    assert len({ident for ident, _ in seen}) == 1, "a thread per call"
    assert all(daemon for _, daemon in seen)


def test_a_stuck_call_never_holds_up_the_next_one() -> None:
    threads = _DaemonThreads(idle_seconds=5)
    release = threading.Event()
    stuck = run(threads, lambda: release.wait(10))
    quick = run(threads, lambda: None)
    assert quick.wait(5), "the second call waited for the stuck one"
    assert not stuck.is_set()
    release.set()
    assert stuck.wait(5)


def test_idle_threads_end_and_a_later_call_still_runs() -> None:
    threads = _DaemonThreads(idle_seconds=0.05)
    before = threading.active_count()
    calls = [run(threads, lambda: time.sleep(0.05)) for _ in range(4)]  # 4 threads at once
    assert all(c.wait(5) for c in calls)
    wait_for(lambda: threading.active_count() <= before, 5, interval=0.02, what="the idle threads to end")
    assert threading.active_count() == before, "idle threads were left running"
    assert run(threads, lambda: None).wait(5)


def test_many_concurrent_submissions_all_run_exactly_once() -> None:
    threads = _DaemonThreads(idle_seconds=0.01)  # threads ending while calls arrive
    counted: list[int] = []
    lock = threading.Lock()

    def count() -> None:
        with lock:
            counted.append(1)

    def submitter() -> None:
        for _ in range(200):
            run(threads, count)
            if len(counted) % 37 == 0:
                time.sleep(0.011)

    submitters = [threading.Thread(target=submitter) for _ in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(10)
    wait_for(lambda: len(counted) >= 800, 10, interval=0.01, what=lambda: f"800 calls (ran {len(counted)})")
    assert len(counted) == 800
