"""The worker SDK: run a Python function over the tasks of a pipeline's MLJobs.

    from mljob.worker import PermanentError, TaskContext, WorkerConfig, run_worker

    def handle(ctx: TaskContext) -> dict:
        if not ctx.item.get("url"):
            raise PermanentError("item has no url")   # fails the item, no retry
        return {"label": classify(ctx.item["url"], **ctx.params)}

    run_worker(handle, WorkerConfig(pipeline="classify"))

A batch handler gets up to N tasks of one job per call and returns one outcome per task:

    from mljob.worker import batch_handler

    @batch_handler(max_size=32, max_wait=0.05)
    def classify_many(tasks: list[TaskContext]) -> list:
        return model.predict([t.item["url"] for t in tasks])   # a value, or an exception, per task

or from a shell: `mljob worker --pipeline classify --handler mypkg.tasks:handle`.
The wire protocol (for workers in other languages) is described in docs/protocol.md.
"""

from mljob.worker.config import WorkerConfig
from mljob.worker.context import PermanentError, TaskContext
from mljob.worker.handler import BatchHandler, Handler, HandlerLoadError, batch_handler, load_handler
from mljob.worker.worker import Worker, run_worker

__all__ = [
    "BatchHandler",
    "Handler",
    "HandlerLoadError",
    "PermanentError",
    "TaskContext",
    "Worker",
    "WorkerConfig",
    "batch_handler",
    "load_handler",
    "run_worker",
]
