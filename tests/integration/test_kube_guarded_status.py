"""The guarded status write of the Kube adapter against the real kube-apiserver.

Issue 14: with no phase read, the patch replaces the whole status guarded only by the UID, so
a status written in between was wiped. It is guarded by the resourceVersion that was read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import config as kube_config

from mljob.adapters.kube import GuardFailed, JobRef, Kube
from support.stack import Kubectl, StackEnv

pytestmark = pytest.mark.usefixtures("crd_installed")

FIELDS = {"phase": "Canceling", "observedGeneration": 1}


@pytest.fixture
def kube(stack: StackEnv) -> Iterator[Kube]:
    adapter = Kube(kube_config.new_client_from_config(config_file=stack.kubeconfig))
    yield adapter
    adapter.close()


async def created(kube: Kube, kubectl: Kubectl, namespace: str) -> tuple[JobRef, dict[str, Any]]:
    """A new MLJob (no status yet) and the object as a writer reads it."""
    body = {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {"name": "guarded"},
        "spec": {"pipeline": "demo", "items": ["a", "b", "c"]},
    }
    kubectl.run("-n", namespace, "create", "-f", "-", stdin=json.dumps(body))
    read = await kube.get_job(namespace, "guarded")
    assert read is not None and not (read.get("status") or {}).get("phase")
    return JobRef(namespace, "guarded", read["metadata"]["uid"]), read


async def test_a_status_written_since_the_read_is_not_wiped(
    kube: Kube, kubectl: Kubectl, namespace: str
) -> None:
    ref, read = await created(kube, kubectl, namespace)
    await kube.patch_status(ref, {"total": 3, "dispatched": 3})  # another writer, in between
    with pytest.raises(GuardFailed):
        await kube.guarded_status(ref, None, FIELDS, read["metadata"]["resourceVersion"])
    now = await kube.get_job(namespace, "guarded")
    assert now is not None
    assert now["status"] == {"total": 3, "dispatched": 3}


async def test_with_nothing_written_since_the_read_the_status_is_replaced(
    kube: Kube, kubectl: Kubectl, namespace: str
) -> None:
    ref, read = await created(kube, kubectl, namespace)
    await kube.guarded_status(ref, None, FIELDS, read["metadata"]["resourceVersion"])
    now = await kube.get_job(namespace, "guarded")
    assert now is not None
    assert now["status"] == FIELDS
