"""The task streams' retention and their job consumers' replicas (issue 15's consumer design)."""

from __future__ import annotations

import pytest
from nats.js.api import RetentionPolicy

from mljob import protocol
from mljob.adapters.jetstream import job_consumer_replicas, job_of_consumer, task_stream_retention

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("replicas", "retention"),
    [(1, RetentionPolicy.WORK_QUEUE), (3, RetentionPolicy.LIMITS), (5, RetentionPolicy.LIMITS)],
)
def test_only_a_replicated_task_stream_has_limits_retention(
    replicas: int, retention: RetentionPolicy
) -> None:
    assert task_stream_retention(replicas) == retention


@pytest.mark.parametrize(
    ("retention", "configured", "expected"),
    [
        (RetentionPolicy.LIMITS, None, 1),  # no RAFT group per job
        ("limits", None, 1),  # the server's answer is a plain string
        (RetentionPolicy.WORK_QUEUE, None, None),  # the stream's own count, the only one NATS takes
        ("workqueue", None, None),
        (None, None, None),
        (RetentionPolicy.LIMITS, 3, 3),  # a setting wins
        (RetentionPolicy.WORK_QUEUE, 1, 1),
    ],
)
def test_a_job_consumer_is_one_replica_on_a_limits_stream_unless_configured(
    retention: RetentionPolicy | str | None, configured: int | None, expected: int | None
) -> None:
    assert job_consumer_replicas(retention, configured) == expected


@pytest.mark.parametrize(
    ("uid", "generation", "name"),
    [
        ("0c0ffee0-0000-4000-8000-0000000000a1", 0, "workers-0c0ffee0-0000-4000-8000-0000000000a1"),
        ("0c0ffee0-0000-4000-8000-0000000000a1", 1, "workers-0c0ffee0-0000-4000-8000-0000000000a1-r1"),
        ("0c0ffee0-0000-4000-8000-0000000000a1", 12, "workers-0c0ffee0-0000-4000-8000-0000000000a1-r12"),
    ],
)
def test_a_replaced_consumer_is_named_by_its_generation_and_parsed_back(
    uid: str, generation: int, name: str
) -> None:
    assert protocol.task_consumer(uid, generation) == name
    assert protocol.parse_task_consumer(name) == (uid, generation)
    assert job_of_consumer("MLJOB_TASKS_p", name) == ("p", uid)


@pytest.mark.parametrize(
    "name",
    [
        "workers-",
        "other-0c0ffee0-0000-4000-8000-0000000000a1",
        "workers-0c0ffee0-0000-4000-8000-0000000000a1-r0x",
    ],
)
def test_names_that_are_not_a_job_consumer_are_not_taken_for_one(name: str) -> None:
    assert job_of_consumer("MLJOB_TASKS_p", name) is None
