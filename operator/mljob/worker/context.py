"""What a handler receives (`TaskContext`) and how it says "do not retry" (`PermanentError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mljob.protocol import JobRef, Task


class PermanentError(Exception):
    """Raise from a handler when retrying cannot help: the item fails at once with this message.

    Any other exception is transient: the task is redelivered (with a growing delay) until the
    job's `max_deliver` is used up, and then the item fails with "exhausted N deliveries: ...".
    """


@dataclass(frozen=True)
class TaskContext:
    """One task as a handler sees it."""

    task: Task
    #: How many times this task has been delivered, this delivery included (1 on the first try).
    attempt: int
    worker_id: str

    @property
    def item(self) -> dict[str, Any]:
        """The item: `id` plus whatever free fields the job's item source gave it."""
        return self.task.item

    @property
    def item_id(self) -> str:
        return self.task.item_id

    @property
    def params(self) -> dict[str, Any]:
        """The job's parameters, the same for every item of the job."""
        return self.task.params

    @property
    def job(self) -> JobRef:
        return self.task.job
