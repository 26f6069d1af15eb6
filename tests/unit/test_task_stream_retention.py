"""The task streams' retention and their job consumers' replicas (issue 15's consumer design)."""

from __future__ import annotations

import pytest
from nats.js.api import RetentionPolicy

from mljob.adapters.jetstream import job_consumer_replicas, task_stream_retention

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("replicas", "retention"),
    [(1, RetentionPolicy.WORK_QUEUE), (3, RetentionPolicy.LIMITS), (5, RetentionPolicy.LIMITS)],
)
def test_only_a_replicated_task_stream_has_limits_retention(replicas: int, retention: RetentionPolicy) -> None:
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
