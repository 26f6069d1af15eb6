"""Worker settings: `WorkerConfig` is the worker's part of the one settings model (mljob.settings).

`WorkerConfig(pipeline="classify")` reads the MLJOB_* environment for what is not passed.
"""

from __future__ import annotations

from mljob.settings import WorkerSettings as WorkerConfig
from mljob.settings import default_worker_id

__all__ = ["WorkerConfig", "default_worker_id"]
