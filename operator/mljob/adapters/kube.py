"""Kubernetes access: MLJob status writes (merge and guarded JSON patches), ConfigMaps, Events,
Leases, and the token and access reviews of the read-only API.

The official client is synchronous; every call runs in a thread of the adapter's own pool (as
many threads as connections to the API server) so the operator's event loop never blocks on
it, and a thousand MLJobs starting at once are not served by asyncio's few default threads.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from mljob.api.models import GROUP, KIND, PLURAL, VERSION
from mljob.core.leases import LeaseRecord

log = logging.getLogger(__name__)


T = TypeVar("T")


def load_config(connections: int = 16) -> client.ApiClient:
    """In-cluster config when running in a pod, else KUBECONFIG / ~/.kube/config; a connection
    pool of `connections` (one per thread of the Kube adapter)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections
    return client.ApiClient(configuration)


class GuardFailed(Exception):
    """The guarded status patch found a phase (or object version) other than the one it read."""


class StatusRefused(Exception):
    """The API server refused a status patch (422): the CRD's transition rules found it moving
    the stored status backwards, so the writer's view of the status is behind the server's."""


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str
    uid: str


class Kube:
    def __init__(self, api: client.ApiClient, threads: int = 16) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking client call, in the adapter's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def get_job(self, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The MLJob, or None when there is none; `timeout` bounds the request (None: the client's)."""
        options: dict[str, Any] = {} if timeout is None else {"_request_timeout": timeout}
        try:
            body: dict[str, Any] = await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, **options
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return body

    async def list_jobs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every MLJob in these namespaces (None: cluster-wide), by a paged LIST from the server.

        Raises on any failed LIST: a caller that needs a complete view (the orphan sweep) must not
        take a partial listing for the truth.
        """
        if namespaces is None:
            return await self._list_all(None)
        jobs: list[dict[str, Any]] = []
        for namespace in namespaces:
            jobs.extend(await self._list_all(namespace))
        return jobs

    async def _list_all(self, namespace: str | None, page: int = 500) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": page}
            if token:
                kwargs["_continue"] = token
            if namespace is None:
                body = await self._call(
                    self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kwargs
                )
            else:
                body = await self._call(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, **kwargs
                )
            items.extend(body.get("items") or [])
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def patch_status(self, job: JobRef, fields: dict[str, Any]) -> None:
        """Merge-patch some status fields (progress, cursor, conditions). Raises StatusRefused
        when the API server's transition rules refuse it."""
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                job.namespace,
                PLURAL,
                job.name,
                {"status": fields},
            )
        except ApiException as err:
            if err.status == 422:
                raise StatusRefused(_refusal(err)) from err
            raise

    async def guarded_status(
        self,
        job: JobRef,
        expected_phase: str | None,
        fields: dict[str, Any],
        resource_version: str | None = None,
    ) -> None:
        """A JSON patch whose `test` op checks the phase we read: a concurrent writer makes it fail.

        With no phase read (`expected_phase` None) the patch replaces the whole status, so it
        tests the `resource_version` of the object read instead: any write since then (a
        status the reader never saw) makes it fail rather than be wiped."""
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/uid", "value": job.uid}]
        if expected_phase is None:
            if not resource_version:
                raise ValueError("a status with no phase is replaced only at the resourceVersion read")
            ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
            ops.append({"op": "add", "path": "/status", "value": {}})
        else:
            ops.append({"op": "test", "path": "/status/phase", "value": expected_phase})
        ops += [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()]
        try:
            await self._call(self._json_patch_status, job, ops)
        except ApiException as err:
            if err.status in (409, 422):
                raise GuardFailed(_reason(err)) from err
            raise

    def _json_patch_status(self, job: JobRef, ops: list[dict[str, Any]]) -> None:
        # Custom objects default to merge-patch; a `test` op needs a real JSON patch. The
        # `_content_type` override works on the old and the new (>= 36) generated clients alike.
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            job.namespace,
            PLURAL,
            job.name,
            ops,
            _content_type="application/json-patch+json",
        )

    async def add_finalizer(
        self, job: JobRef, finalizer: str, current: list[str], resource_version: str
    ) -> None:
        """A JSON patch that appends `finalizer` to the list read (`current`), only if the object
        is still the one read: with no list yet it tests the resourceVersion (an `add` would
        replace a list another controller just created), else the uid. Raises GuardFailed when
        the object changed; gone is fine."""
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/uid", "value": job.uid}]
        if current:
            ops.append({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer})
        else:
            ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
            ops.append({"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})
        await self._patch_metadata(job, ops)

    async def remove_finalizer(self, job: JobRef, finalizer: str, current: list[str]) -> None:
        """Remove `finalizer` at the index it had in the list read, testing that it is still
        there (other controllers' finalizers are never touched). Raises GuardFailed when the
        list changed; gone is fine."""
        if finalizer not in current:
            return
        at = current.index(finalizer)
        ops = [
            {"op": "test", "path": "/metadata/uid", "value": job.uid},
            {"op": "test", "path": f"/metadata/finalizers/{at}", "value": finalizer},
            {"op": "remove", "path": f"/metadata/finalizers/{at}"},
        ]
        await self._patch_metadata(job, ops)

    async def _patch_metadata(self, job: JobRef, ops: list[dict[str, Any]]) -> None:
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                job.namespace,
                PLURAL,
                job.name,
                ops,
                _content_type="application/json-patch+json",
            )
        except ApiException as err:
            if err.status == 404:
                return
            if err.status in (409, 422):
                raise GuardFailed(_reason(err)) from err
            raise

    async def delete_job(self, job: JobRef) -> None:
        """Delete the MLJob, only if it is still the same object (UID precondition); gone is fine."""
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=job.uid))
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                job.namespace,
                PLURAL,
                job.name,
                body=options,
            )
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    async def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(cm.data or {})

    async def event(self, job: JobRef, reason: str, message: str, warning: bool = False) -> None:
        """Best effort: an Event that cannot be posted is logged, never fatal."""
        stamp = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{job.name}.", namespace=job.namespace),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=job.name,
                namespace=job.namespace,
                uid=job.uid,
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
            source=client.V1EventSource(component="mljob-operator"),
        )
        try:
            await self._call(self.core.create_namespaced_event, job.namespace, body)
        except Exception as err:  # an Event is never worth failing an action for
            why = err.reason if isinstance(err, ApiException) else f"{type(err).__name__}: {err}"
            log.warning("could not post event %s for %s/%s: %s", reason, job.namespace, job.name, why)

    # Leases (leader election). The operator gives its Leadership a Kube of its own (two
    # threads), so a renewal never queues behind a thousand MLJobs' status writes.

    @functools.cached_property
    def _coordination(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self.api)

    async def get_lease(self, namespace: str, name: str, timeout: float) -> LeaseObject | None:
        """The Lease, or None when there is none."""
        try:
            lease = await self._call(
                self._coordination.read_namespaced_lease, name, namespace, _request_timeout=timeout
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return _lease_object(lease)

    async def create_lease(
        self, namespace: str, name: str, record: LeaseRecord, timeout: float
    ) -> LeaseObject:
        """Raises LeaseConflict when another replica created it first."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": _lease_spec(record),
        }
        try:
            lease = await self._call(
                self._coordination.create_namespaced_lease, namespace, body, _request_timeout=timeout
            )
        except ApiException as err:
            if err.status == 409:
                raise LeaseConflict(_reason(err)) from err
            raise
        return _lease_object(lease)

    async def replace_lease(
        self, namespace: str, name: str, record: LeaseRecord, resource_version: str, timeout: float
    ) -> LeaseObject:
        """Write the spec only if the Lease is still at `resource_version` (LeaseConflict if not:
        someone else wrote it since it was read)."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": resource_version},
            "spec": _lease_spec(record),
        }
        try:
            lease = await self._call(
                self._coordination.replace_namespaced_lease, name, namespace, body, _request_timeout=timeout
            )
        except ApiException as err:
            if err.status == 409:
                raise LeaseConflict(_reason(err)) from err
            raise
        return _lease_object(lease)

    # Reviews (the read-only API, `mljob api`): who a bearer token is, and what that user may do.
    # Both are create calls that store nothing; the answer is in the returned object's status.

    @functools.cached_property
    def _authentication(self) -> client.AuthenticationV1Api:
        return client.AuthenticationV1Api(self.api)

    @functools.cached_property
    def _authorization(self) -> client.AuthorizationV1Api:
        return client.AuthorizationV1Api(self.api)

    async def review_token(self, token: str, timeout: float) -> dict[str, Any]:
        """A TokenReview of `token`: its status as the apiserver returns it (`authenticated`,
        `user` with `username`, `uid`, `groups`, `extra`; `error`). The token travels in the
        request body only; the reply echoes it in `spec`, which is dropped here, never logged."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        review = await self._call(self._authentication.create_token_review, body, _request_timeout=timeout)
        status: dict[str, Any] = self.api.sanitize_for_serialization(review.status) or {}
        return status

    async def review_access(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A SubjectAccessReview of `spec` (user, groups, uid, extra, resourceAttributes): its
        status (`allowed`, `denied`, `reason`, `evaluationError`)."""
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        review = await self._call(
            self._authorization.create_subject_access_review, body, _request_timeout=timeout
        )
        status: dict[str, Any] = self.api.sanitize_for_serialization(review.status) or {}
        return status

    async def list_jobs_page(
        self, namespace: str, limit: int, continue_token: str | None, timeout: float
    ) -> dict[str, Any]:
        """One page of a namespace's MLJobs (the LIST's `items` and `metadata.continue`)."""
        kwargs: dict[str, Any] = {"limit": limit, "_request_timeout": timeout}
        if continue_token:
            kwargs["_continue"] = continue_token
        body: dict[str, Any] = await self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, **kwargs
        )
        return body


class LeaseConflict(Exception):
    """Someone else wrote the Lease since it was read (or created it first): read it again."""


@dataclass(frozen=True)
class LeaseObject:
    """A Lease as read: its spec and the resourceVersion a replace must carry."""

    record: LeaseRecord
    resource_version: str


def _micro_time(stamp: datetime | None) -> str | None:
    """A MicroTime as the apiserver parses it: always six fraction digits and a `Z` (the client's
    own isoformat drops the fraction at .000000, which the apiserver refuses)."""
    if stamp is None:
        return None
    return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lease_spec(record: LeaseRecord) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "holderIdentity": record.holder or None,
        "leaseDurationSeconds": record.duration_seconds,
        "acquireTime": _micro_time(record.acquire_time),
        "renewTime": _micro_time(record.renew_time),
        "leaseTransitions": record.transitions,
    }
    return {key: value for key, value in spec.items() if value is not None}


def _lease_object(lease: Any) -> LeaseObject:
    spec = lease.spec
    record = LeaseRecord(
        holder=(spec.holder_identity or None) if spec else None,
        duration_seconds=spec.lease_duration_seconds if spec else None,
        acquire_time=spec.acquire_time if spec else None,
        renew_time=spec.renew_time if spec else None,
        transitions=(spec.lease_transitions or 0) if spec else 0,
    )
    return LeaseObject(record, str(lease.metadata.resource_version))


def _reason(err: ApiException) -> str:
    try:
        return str(json.loads(err.body).get("message", err.reason))
    except (TypeError, ValueError):
        return str(err.reason)


def _refusal(err: ApiException) -> str:
    """The API server's own words for a refused write (its Status message), else the reason."""
    try:
        return str(json.loads(err.body or "{}").get("message") or err.reason)
    except (TypeError, ValueError):
        return str(err.reason)
