"""MLJobs from Python and the `kubectl mljob` plugin's library: `Client` (core.py) submits,
waits, reads items and results through the read-only API, retries and cancels.

One module per job: `kubeconfig` (the cluster as kubectl finds it), `jobs` (MLJobs through the
Kubernetes API), `transport` and `reads` (the read-only API over HTTP, page by page or streamed),
`manifests` (submissions and retries, pure), `itemsource` (item fields from the original's
source), `rate` (rate and ETA from samples), `tables`, `statusview`, `runbook`, `progress` and
`output` (what is printed or written), `watching` (the watch of MLJobs). It needs `kubernetes`
(the client extra); pandas, pyarrow and tqdm only where a function says so (the notebook extra).
"""

from __future__ import annotations

from mljob.client.core import Client
from mljob.client.errors import (
    ClientError,
    Conflict,
    Forbidden,
    Interrupted,
    MissingExtra,
    NotFound,
    Unauthorized,
    Unavailable,
    UsageError,
)
from mljob.client.reads import Page

__all__ = [
    "Client",
    "ClientError",
    "Conflict",
    "Forbidden",
    "Interrupted",
    "MissingExtra",
    "NotFound",
    "Page",
    "Unauthorized",
    "Unavailable",
    "UsageError",
]
