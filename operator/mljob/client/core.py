"""`mljob.client.Client`: MLJobs from Python (a notebook, a script), the same as the CLI does.

    from mljob.client import Client

    mlj = Client()                                     # the kubeconfig's cluster and namespace
    name = mlj.submit("thumbs", pipeline="thumbnails", items=["a.jpg", "b.jpg"])
    mlj.wait(name)                                     # a progress bar (tqdm where installed)
    failed = mlj.items_frame(name, outcome="failed")   # a pandas DataFrame (pandas installed)
    for row in mlj.results(name): ...                  # every result, streamed
    retried = mlj.retry(name)                          # a new MLJob of the failed items

Kubernetes is reached as kubectl does (`kubeconfig`, `context`, the context's namespace); the
read-only API at `api_url` or through the apiserver's service proxy (`api_service`), with
`token` or the kubeconfig user's (README, "Inspecting jobs"). Errors are `ClientError`s with a
one-line message. Nothing connects before it is needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from mljob.api.models import MAX_INLINE_ITEMS
from mljob.client import itemsource, manifests, output, reads, statusview
from mljob.client.errors import ClientError, Forbidden, Unauthorized, UsageError, require
from mljob.client.jobs import Jobs
from mljob.client.kubeconfig import Connection, connect
from mljob.client.progress import TERMINAL
from mljob.client.rate import Rate, SampleLog, average_since, eta, from_throughput, rate
from mljob.client.transport import ApiTransport, ServiceRef
from mljob.client.watching import wait as wait_for_job


class Client:
    """MLJobs of one cluster: submit, wait, read items and results, retry, cancel."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        api_url: str | None = None,
        api_service: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        from mljob.settings import ClientSettings, SettingsError, load

        try:
            settings = load(ClientSettings, api_url=api_url, api_service=api_service, api_token=token)
        except SettingsError as err:
            raise UsageError(str(err)) from None
        self._namespace = namespace
        self._kubeconfig = kubeconfig
        self._context = context
        self._timeout = timeout
        self.api_url = settings.api_url
        self.api_service = ServiceRef.parse(settings.api_service)
        self._token = settings.api_token.get_secret_value() if settings.api_token is not None else None
        self._conn: Connection | None = None
        self._jobs: Jobs | None = None
        self._api: ApiTransport | None = None

    # ------------------------------------------------------------------ connections
    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = connect(self._kubeconfig, self._context, self._namespace, self._timeout)
        return self._conn

    @property
    def namespace(self) -> str:
        """`namespace` as given, else the kubeconfig context's, else `default`."""
        return self._namespace or self.conn.namespace

    @property
    def jobs(self) -> Jobs:
        if self._jobs is None:
            self._jobs = Jobs(self.conn)
        return self._jobs

    @property
    def api(self) -> ApiTransport:
        if self._api is None:
            conn = self.conn if self.api_url is None or self._token is None else self._conn
            self._api = ApiTransport(conn, self.api_url, self.api_service, self._token, self._timeout * 2)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    # ------------------------------------------------------------------ MLJobs (Kubernetes)
    def get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The MLJob as the apiserver has it."""
        return self.jobs.get(self._ns(namespace), name)

    def list(self, namespace: str | None = None, all_namespaces: bool = False) -> list[dict[str, Any]]:
        found = self.jobs.list(None if all_namespaces else self._ns(namespace))
        return list(found.get("items") or [])

    def create(self, made: manifests.Manifests, namespace: str | None = None) -> dict[str, Any]:
        """Create the ConfigMaps, then the MLJob, then make it their owner; nothing is left
        behind when the MLJob is refused."""
        namespace = self._ns(namespace)
        done: list[str] = []
        try:
            for configmap in made.configmaps:
                self.jobs.create_configmap(namespace, configmap)
                done.append(configmap["metadata"]["name"])
            job = self.jobs.create(namespace, made.job)
        except BaseException:
            for name in done:
                self.jobs.delete_configmap(namespace, name)
            raise
        for name in done:
            self.jobs.own_configmap(namespace, name, job)
        return job

    def submit(
        self,
        name: str,
        pipeline: str,
        items: Iterable[object] | None = None,
        *,
        url: str | None = None,
        sha256: str | None = None,
        namespace: str | None = None,
        labels: dict[str, str] | None = None,
        wait: bool = False,
        progress: bool = True,
        timeout: float | None = None,
        max_inline: int = MAX_INLINE_ITEMS,
        **spec: Any,
    ) -> str:
        """Create an MLJob of `items` (ids, or dicts with an `id` and fields) or of the manifest
        at `url`; spec fields as keywords (`params=`, `max_deliver=`, `failure_threshold=` ...).
        More than `max_inline` items go into ConfigMaps. Returns its name; with `wait`, once it
        has finished."""
        made = manifests.submission(name, pipeline, items, url, sha256, labels, max_inline, **spec)
        created = self.create(made, namespace)
        if wait:
            self.wait(name, namespace, timeout=timeout, progress=progress)
        return str(created["metadata"]["name"])

    def cancel(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """Set `spec.cancel: true` (the operator then cancels it); a job that has already
        finished is returned as it is."""
        namespace = self._ns(namespace)
        body = self.jobs.get(namespace, name)
        if (body.get("status") or {}).get("phase") in TERMINAL or (body.get("spec") or {}).get("cancel"):
            return body
        return self.jobs.cancel(namespace, name)

    def wait(
        self,
        name: str,
        namespace: str | None = None,
        timeout: float | None = None,
        progress: bool = True,
        out: TextIO | None = None,
    ) -> dict[str, Any]:
        """The MLJob's status once it has finished (TimeoutError after `timeout` seconds), with a
        progress bar meanwhile (on `out`, default stderr; tqdm's where tqdm is installed)."""
        body = wait_for_job(self.jobs, self._ns(namespace), name, timeout=timeout, progress=progress, out=out)
        return dict(body.get("status") or {})

    # ------------------------------------------------------------------ the read-only API
    def summary(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The API's summary: the MLJob, Postgres, Redis and NATS side by side, and where they disagree."""
        return reads.summary(self.api, self._ns(namespace), name)

    def status(
        self, name: str, namespace: str | None = None, samples: SampleLog | None = None
    ) -> dict[str, Any]:
        """The summary with the rate over the last minute and the ETA (`rate_of`) and the runbook's
        word on each disagreement."""
        data = self.summary(name, namespace)
        return statusview.as_data(data, *self.rate_of(data, samples))

    def rate_of(
        self, summary: dict[str, Any], samples: SampleLog | None = None
    ) -> tuple[Rate | None, float | None]:
        """The rate over the last minute and the ETA of a running job (None, None when it has
        finished): from the API's throughput (Postgres' count of results per 5 s), else from
        this machine's earlier looks at the job, else the average since it started."""
        status = summary.get("status") or {}
        total, processed, _ = statusview.counts(summary)
        if status.get("phase") in TERMINAL:
            return None, None
        current = None
        try:
            answer = reads.throughput(self.api, str(summary.get("namespace")), str(summary.get("name")))
            current = from_throughput(answer.get("points") or [], answer.get("end"))
        except (Forbidden, Unauthorized):
            raise
        except ClientError:  # an API without the throughput, or Postgres not readable now
            current = None
        now = time.time()
        log = samples or SampleLog(str(summary.get("uid") or "unknown"))
        sampled = log.record(processed, now)
        if current is None:
            current = rate(sampled, now) or average_since(status.get("startTime"), processed, now)
        return current, (eta(total - processed, current) if total else None)

    def pages(
        self,
        name: str,
        outcome: str | None = None,
        reason: str | None = None,
        namespace: str | None = None,
        page_size: int = reads.DEFAULT_PAGE_SIZE,
        after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[reads.Page]:
        """The job's items a page at a time (the API's keyset cursor: `after` is a page's `next`)."""
        return reads.pages(self.api, self._ns(namespace), name, outcome, reason, page_size, after, limit)

    def items(
        self,
        name: str,
        outcome: str | None = None,
        reason: str | None = None,
        namespace: str | None = None,
        page_size: int = reads.DEFAULT_PAGE_SIZE,
    ) -> Iterator[dict[str, Any]]:
        """Every item (of one `outcome`: succeeded, failed, pending; failed ones of one `reason`),
        by id: id, outcome, reason, error, attempts, worker, finished."""
        for current in self.pages(name, outcome, reason, namespace, page_size):
            yield from current.items

    def failed(
        self, name: str, reason: str | None = None, namespace: str | None = None
    ) -> Iterator[dict[str, Any]]:
        return self.items(name, "failed", reason, namespace)

    def results(self, name: str, namespace: str | None = None) -> Iterator[dict[str, Any]]:
        """Every result, streamed: id, outcome, reason, error, attempts, worker, finished, result."""
        return reads.results(self.api, self._ns(namespace), name)

    def export(self, name: str, path: str | None, fmt: str = "jsonl", namespace: str | None = None) -> int:
        """The results written to `path` (stdout: None) as jsonl, csv or parquet (pyarrow)."""
        if fmt == "parquet":
            require("pyarrow", "parquet")
            pieces = reads.export(self.api, self._ns(namespace), name, "jsonl")
        elif fmt in ("jsonl", "csv"):
            pieces = reads.export(self.api, self._ns(namespace), name, fmt)  # type: ignore[arg-type]
        else:
            raise UsageError(f"format: one of {', '.join(output.RESULT_FORMATS)} expected, got {fmt!r}")
        with contextlib.closing(pieces):
            return output.write_results(pieces, fmt, path)

    def items_frame(
        self, name: str, outcome: str | None = None, reason: str | None = None, namespace: str | None = None
    ) -> Any:
        """The items as a pandas DataFrame (needs pandas: the notebook extra)."""
        pd: Any = require("pandas", "items_frame")
        return pd.DataFrame.from_records(
            self.items(name, outcome, reason, namespace), columns=list(reads.ITEM_COLUMNS)
        )

    def results_frame(self, name: str, namespace: str | None = None) -> Any:
        """The results as a pandas DataFrame, `result` as the handler returned it (needs pandas)."""
        pd: Any = require("pandas", "results_frame")
        return pd.DataFrame.from_records(self.results(name, namespace), columns=list(reads.RESULT_COLUMNS))

    # ------------------------------------------------------------------ retry
    def retry_manifests(
        self,
        name: str,
        reason: str | None = None,
        namespace: str | None = None,
        new_name: str | None = None,
        ids_only: bool = False,
        max_inline: int = MAX_INLINE_ITEMS,
    ) -> manifests.Manifests:
        """What `retry` would create: the failed items (of `reason`) read from the API, page by
        page, with their fields from the original's item source (unless `ids_only`)."""
        namespace = self._ns(namespace)
        original = self.jobs.get(namespace, name)
        uid = str(original["metadata"]["uid"])
        ids: list[str] = []
        for current in reads.pages(self.api, namespace, name, "failed", reason, reads.MAX_PAGE_SIZE):
            if current.uid and current.uid != uid:
                raise ClientError(f"MLJob {namespace}/{name} was re-created while it was read: start again")
            ids.extend(str(item["id"]) for item in current.items)
        if not ids:
            which = f"failed items of reason {reason}" if reason else "failed items"
            raise ClientError(f"MLJob {namespace}/{name} has no {which}: nothing to retry")
        fields = {} if ids_only else itemsource.fields_of(self.jobs, original, set(ids))
        items = [fields.get(item_id) or {"id": item_id} for item_id in ids]
        return manifests.retry(original, items, reason, new_name, max_inline)

    def retry(
        self,
        name: str,
        reason: str | None = None,
        namespace: str | None = None,
        new_name: str | None = None,
        ids_only: bool = False,
        max_inline: int = MAX_INLINE_ITEMS,
        wait: bool = False,
        progress: bool = True,
    ) -> str:
        """A new MLJob of `name`'s failed items (or those of one `reason`), its spec otherwise
        the same, linked to it by label and annotation; returns the new name."""
        made = self.retry_manifests(name, reason, namespace, new_name, ids_only, max_inline)
        created = self.create(made, namespace)
        new = str(created["metadata"]["name"])
        if wait:
            self.wait(new, namespace, progress=progress)
        return new
