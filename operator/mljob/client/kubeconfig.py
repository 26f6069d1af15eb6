"""Kubernetes as kubectl reaches it: `--kubeconfig`, else `KUBECONFIG` (a list of files, merged),
else `~/.kube/config`; `--context`, else the current context; the namespace `-n`, else the
context's, else `default`. In a pod without a kubeconfig, the in-cluster account.

The official client reads `KUBECONFIG` once, when it is imported; the path is resolved here at
each connect, so a notebook that sets the variable later is still heard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mljob.client.errors import ClientError, UsageError

DEFAULT_KUBECONFIG = "~/.kube/config"
#: The namespace file of a pod's ServiceAccount (in-cluster).
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass
class Connection:
    """An authenticated API client, the namespace to use, and how the user authenticates."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str
    #: The apiserver's URL.
    host: str
    #: whose credentials these are, for messages: the context's user, or "in-cluster"
    user: str
    #: seconds one request may take
    timeout: float = 30.0

    def bearer_token(self) -> str | None:
        """The kubeconfig user's bearer token (a token, a token file, an exec plugin's or OIDC
        provider's, refreshed when it expired); None for a client certificate or basic auth."""
        configuration = self.api.configuration
        value = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if isinstance(value, str) and value.lower().startswith("bearer "):
            return value[len("bearer ") :].strip() or None
        return None

    def close(self) -> None:
        self.api.close()


def kubeconfig_path(explicit: str | None) -> str:
    """The kubeconfig file(s) kubectl would read (`os.pathsep`-separated, as KUBECONFIG)."""
    if explicit:
        return explicit
    return os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(POD_NAMESPACE_FILE)


def connect(
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    request_timeout: float = 30.0,
) -> Connection:
    """A client for the cluster the kubeconfig names (UsageError when there is none to read)."""
    from kubernetes import client, config

    path = kubeconfig_path(kubeconfig)
    files = [os.path.expanduser(p) for p in path.split(os.pathsep) if p]
    configuration = client.Configuration()
    if not any(os.path.exists(f) for f in files) and kubeconfig is None and _in_cluster():
        config.load_incluster_config(client_configuration=configuration)
        with open(POD_NAMESPACE_FILE, encoding="utf-8") as file:
            pod_namespace = file.read().strip()
        return Connection(
            _api_client(configuration),
            namespace or pod_namespace,
            configuration.host,
            "in-cluster",
            request_timeout,
        )
    if not any(os.path.exists(f) for f in files):
        raise UsageError(f"no kubeconfig at {path}: pass --kubeconfig or set KUBECONFIG")
    try:
        contexts, current = config.list_kube_config_contexts(config_file=path)
        chosen = current
        if context is not None:
            chosen = next((c for c in contexts if c.get("name") == context), None)
            if chosen is None:
                known = ", ".join(sorted(str(c.get("name")) for c in contexts)) or "none"
                raise UsageError(f"context {context!r} is not in {path} (it has: {known})")
        config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
    except config.ConfigException as err:
        raise UsageError(f"cannot use the kubeconfig {path}: {err}") from None
    except (OSError, ValueError) as err:
        raise ClientError(f"cannot read the kubeconfig {path}: {err}") from None
    details = (chosen or {}).get("context") or {}
    return Connection(
        api=_api_client(configuration),
        namespace=namespace or str(details.get("namespace") or "default"),
        host=str(configuration.host),
        user=str(details.get("user") or "the kubeconfig's user"),
        timeout=request_timeout,
    )


def _api_client(configuration: Any) -> Any:
    from kubernetes import client

    # A refused connection fails at once rather than after urllib3's three silent retries.
    configuration.retries = 1
    return client.ApiClient(configuration)
