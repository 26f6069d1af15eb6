"""The MLJobs themselves, through the Kubernetes API: what the read-only API does not do.

Read one, list or watch them, create one (a submission, a retry) with its ConfigMaps, and cancel
one (`spec.cancel: true`, a merge patch). Every refusal of the apiserver becomes a one-line
`ClientError` that says what was refused and to whom.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from mljob.api.models import GROUP, PLURAL, VERSION
from mljob.client.errors import ClientError, Conflict, Forbidden, NotFound, Unauthorized, Unavailable
from mljob.client.kubeconfig import Connection

RESOURCE = f"{PLURAL}.{GROUP}"


def _message(err: Any) -> str:
    """The apiserver's own message in a refusal (its Status body), else its reason."""
    body = getattr(err, "body", None)
    try:
        status = json.loads(body) if body else {}
    except (TypeError, ValueError):
        status = {}
    message = status.get("message") if isinstance(status, dict) else None
    return str(message or getattr(err, "reason", "") or err).strip()


def kube_error(conn: Connection, err: Exception, verb: str, what: str, namespace: str | None) -> ClientError:
    """A ClientError for a failed Kubernetes call: `verb` of `what` (e.g. get, mljobs/NAME)."""
    from kubernetes.client.rest import ApiException

    where = f" in namespace {namespace}" if namespace else " cluster-wide"
    if not isinstance(err, ApiException) or not err.status:
        reason = getattr(err, "reason", None) or err
        return Unavailable(f"cannot reach the Kubernetes API at {conn.host} ({type(err).__name__}: {reason})")
    status, message = int(err.status), _message(err)
    if status == 401:
        return Unauthorized(
            f"the Kubernetes API at {conn.host} does not accept the credentials of {conn.user} "
            f"({message}): log in again, or pass another --kubeconfig or --context"
        )
    if status == 403:
        return Forbidden(f"your credentials ({conn.user}) may not {verb} {what}{where}: {message}")
    if status == 404:
        kind, _, name = what.partition("/")
        if name:
            return NotFound(f"no {_kind(kind)} {name!r}{where}")
        return NotFound(f"{message} (is the MLJob CRD installed? kubectl apply -f crds/)")
    if status == 409:
        return Conflict(f"cannot {verb} {what}{where}: {message}")
    if status in (429, 500, 503, 504):
        return Unavailable(f"the Kubernetes API could not {verb} {what} now ({status}: {message}); try again")
    return ClientError(f"the Kubernetes API refused to {verb} {what}{where} ({status}): {message}")


def _kind(resource: str) -> str:
    return {"mljobs": "MLJob", "configmaps": "ConfigMap", "services": "Service"}.get(resource, resource)


class Jobs:
    """MLJobs (and their ConfigMaps) through one authenticated client."""

    def __init__(self, conn: Connection) -> None:
        from kubernetes import client

        self.conn = conn
        self.custom = client.CustomObjectsApi(conn.api)
        self.core = client.CoreV1Api(conn.api)

    def _fail(self, err: Exception, verb: str, what: str, namespace: str | None) -> ClientError:
        return kube_error(self.conn, err, verb, what, namespace)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            body: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.conn.timeout
            )
        except Exception as err:
            raise self._fail(err, "get", f"mljobs/{name}", namespace) from None
        return body

    def list(self, namespace: str | None) -> dict[str, Any]:
        """The MLJobs of `namespace` (None: every namespace), with the list's resourceVersion."""
        try:
            if namespace is None:
                found = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, _request_timeout=self.conn.timeout
                )
            else:
                found = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, _request_timeout=self.conn.timeout
                )
        except Exception as err:
            raise self._fail(err, "list", "mljobs", namespace) from None
        return dict(found)

    def watch(
        self, namespace: str | None, resource_version: str, timeout_seconds: int
    ) -> Iterator[dict[str, Any]]:
        """The MLJob events after `resource_version` for up to `timeout_seconds` (then it ends);
        an expired version raises Conflict (410 Gone: list again)."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        watcher = watch.Watch()
        kwargs: dict[str, Any] = {
            "resource_version": resource_version,
            "timeout_seconds": timeout_seconds,
            "allow_watch_bookmarks": True,
            "_request_timeout": timeout_seconds + self.conn.timeout,
        }
        try:
            if namespace is None:
                stream = watcher.stream(
                    self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kwargs
                )
            else:
                stream = watcher.stream(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, **kwargs
                )
            for event in stream:
                if event.get("type") == "ERROR":
                    raw = event.get("raw_object") or {}
                    if int(raw.get("code") or 0) == 410:
                        raise Conflict("the watch's resourceVersion expired")
                    raise ClientError(f"the MLJob watch failed: {raw.get('message') or raw}")
                yield event
        except ApiException as err:
            if err.status == 410:
                raise Conflict("the watch's resourceVersion expired") from None
            raise self._fail(err, "watch", "mljobs", namespace) from None
        except ClientError:
            raise
        except Exception as err:
            raise self._fail(err, "watch", "mljobs", namespace) from None
        finally:
            watcher.stop()

    def create(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        name = (body.get("metadata") or {}).get("name") or (body.get("metadata") or {}).get(
            "generateName", ""
        )
        try:
            created: dict[str, Any] = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, dict(body), _request_timeout=self.conn.timeout
            )
        except Exception as err:
            failure = self._fail(err, "create", f"mljobs/{name}", namespace)
            if isinstance(failure, NotFound):  # a create's 404 is the namespace, not the job
                failure = NotFound(f"no namespace {namespace!r} (or no MLJob CRD): {_message(err)}")
            raise failure from None
        return created

    def cancel(self, namespace: str, name: str) -> dict[str, Any]:
        """`spec.cancel: true` (a merge patch: nothing else of the spec is sent)."""
        try:
            patched: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"spec": {"cancel": True}},
                _request_timeout=self.conn.timeout,
            )
        except Exception as err:
            raise self._fail(err, "patch", f"mljobs/{name}", namespace) from None
        return patched

    def configmap(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data, or None when there is none of that name."""
        from kubernetes.client.rest import ApiException

        try:
            found = self.core.read_namespaced_config_map(name, namespace, _request_timeout=self.conn.timeout)
        except ApiException as err:
            if err.status == 404:
                return None
            raise self._fail(err, "get", f"configmaps/{name}", namespace) from None
        except Exception as err:
            raise self._fail(err, "get", f"configmaps/{name}", namespace) from None
        return dict(found.data or {})

    def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> None:
        name = body["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(namespace, dict(body), _request_timeout=self.conn.timeout)
        except Exception as err:
            raise self._fail(err, "create", f"configmaps/{name}", namespace) from None

    def own_configmap(self, namespace: str, name: str, owner: Mapping[str, Any]) -> None:
        """Make the MLJob `owner` the ConfigMap's owner: deleted with it by the garbage collector."""
        meta = owner["metadata"]
        reference = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MLJob",
            "name": meta["name"],
            "uid": meta["uid"],
        }
        patch = {"metadata": {"ownerReferences": [reference]}}
        try:
            self.core.patch_namespaced_config_map(name, namespace, patch, _request_timeout=self.conn.timeout)
        except Exception as err:
            raise self._fail(err, "patch", f"configmaps/{name}", namespace) from None

    def delete_configmap(self, namespace: str, name: str) -> None:
        """Best effort (a ConfigMap left over when its MLJob could not be created)."""
        # the creation's own error is the one to report
        with contextlib.suppress(Exception):
            self.core.delete_namespaced_config_map(name, namespace, _request_timeout=self.conn.timeout)
