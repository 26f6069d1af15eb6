"""The orphan sweep and `mljob chaos` against real NATS, Redis, Postgres and kube-apiserver (row 13).

No operator runs here: live jobs are MLJobs created with kubectl whose resources the test creates
with the adapters, exactly as dispatch would.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator

import pytest
from kubernetes import config as kube_config
from nats.js.errors import NotFoundError

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.kube import Kube
from mljob.adapters.services import Services
from mljob.controller.sweep import delete, find_orphans, sweep_orphans
from mljob.core.orphans import Kind
from mljob.settings import OperatorSettings
from mljob_dev.chaos import open_services, plant
from support.harness import child_env, mljob_cmd, mljob_manifest
from support.stack import Kubectl, StackEnv
from support.waiting import wait_for

PIPELINE = "sweep"


@pytest.fixture
async def services(
    stack: StackEnv, crd_installed: None, namespace: str, pg_schema: str, prefix: str
) -> AsyncIterator[Services]:
    """The operator's connections, as a namespaced operator of `namespace` with a zero grace."""
    settings = OperatorSettings(
        nats_url=stack.nats_url,
        redis_url=stack.redis_url,
        postgres_dsn=stack.postgres_dsn,
        postgres_schema=pg_schema,
        redis_prefix=prefix,
        namespaces=[namespace],
        orphan_grace_seconds=0,
    )
    kube = Kube(kube_config.new_client_from_config(config_file=stack.kubeconfig))
    opened = await open_services(settings, kube)
    yield opened
    await opened.close()


async def present(services: Services, uid: str, pipeline: str = PIPELINE) -> dict[str, bool]:
    """Which of the job's resources exist."""
    try:
        await services.registry.get(protocol.registry_key(pipeline, uid))
        registry = True
    except NotFoundError:
        registry = False
    pattern = f"{services.settings.redis_prefix}:{{{uid}}}:*"
    keys = [k async for k in services.redis.scan_iter(match=pattern)]
    return {
        "consumer": await jetstream.job_consumer_exists(services.js, pipeline, uid),
        "registry": registry,
        "redis": bool(keys),
    }


ALL = {"consumer": True, "registry": True, "redis": True}
NONE = {"consumer": False, "registry": False, "redis": False}


def live_job(kubectl: Kubectl, namespace: str, name: str) -> str:
    manifest = mljob_manifest(name, PIPELINE, ["a", "b"])
    kubectl.run("-n", namespace, "apply", "--server-side", "-f", "-", stdin=manifest)
    return str(kubectl.json("-n", namespace, "get", "mljob", name)["metadata"]["uid"])


def chaos(stack: StackEnv, services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env(
        stack.as_env(),
        MLJOB_POSTGRES_SCHEMA=services.settings.postgres_schema or "",
        MLJOB_REDIS_PREFIX=services.settings.redis_prefix,
    )
    proc = subprocess.run(
        mljob_cmd("chaos", *args), env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"mljob chaos {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


async def test_sweep_removes_orphans_and_leaves_live_jobs_alone(
    stack: StackEnv, kubectl: Kubectl, namespace: str, services: Services
) -> None:
    live = live_job(kubectl, namespace, "live")
    await plant(services, PIPELINE, namespace, uid=live)
    planted = await asyncio.to_thread(
        chaos,
        stack,
        services,
        "plant-orphans",
        "--count",
        "2",
        "--pipeline",
        PIPELINE,
        "--namespace",
        namespace,
    )
    by_cli = planted.stdout.split()
    assert len(by_cli) == 2, planted.stdout
    by_function = await plant(services, PIPELINE, namespace)
    await jetstream.ensure_results_stream(services.js)
    await jetstream.ensure_advisory_stream(services.js)
    orphans = [*by_cli, by_function]
    for uid in [live, *orphans]:
        assert await present(services, uid) == ALL

    report = await sweep_orphans(services)

    assert report.skipped is None
    for uid in orphans:
        assert await present(services, uid) == NONE, uid
    assert await present(services, live) == ALL
    removed = {(r.kind, r.uid) for r in report.removed}
    assert removed == {(kind, uid) for uid in orphans for kind in Kind}
    # Shared streams share the MLJOB_ prefix but are never a job's.
    for shared in (protocol.RESULTS_STREAM, protocol.ADVISORY_STREAM):
        await services.js.stream_info(shared)


async def test_resources_of_a_terminal_mljob_are_orphans(
    kubectl: Kubectl, namespace: str, services: Services
) -> None:
    done = live_job(kubectl, namespace, "done")
    await plant(services, PIPELINE, namespace, uid=done)
    status = '{"status": {"phase": "Succeeded", "total": 2, "processed": 2, "failed": 0}}'
    kubectl.run(
        "-n", namespace, "patch", "mljob", "done", "--subresource=status", "--type=merge", "-p", status
    )

    await sweep_orphans(services)

    assert await present(services, done) == NONE


async def test_a_resource_younger_than_the_grace_period_is_kept(namespace: str, services: Services) -> None:
    uid = await plant(services, PIPELINE, namespace)
    services.settings.orphan_grace_seconds = 300

    report = await sweep_orphans(services)

    assert uid not in {r.uid for r in report.removed}
    assert await present(services, uid) == ALL
    # The same sweep with no grace takes it: it was kept for its age alone.
    services.settings.orphan_grace_seconds = 0
    await sweep_orphans(services)
    assert await present(services, uid) == NONE


async def test_a_namespaced_sweep_keeps_what_it_does_not_own(namespace: str, services: Services) -> None:
    elsewhere = await plant(services, PIPELINE, "some-other-namespace")
    unowned = await plant(services, PIPELINE, None)
    ours = await plant(services, PIPELINE, namespace)

    report = await sweep_orphans(services)

    assert {r.uid for r in report.removed} >= {ours}
    assert await present(services, ours) == NONE
    assert await present(services, elsewhere) == ALL
    assert await present(services, unowned) == ALL
    # A cluster-wide operator would take both (dry run: other tests' leftovers are not ours to delete).
    services.settings.namespaces = []
    _, orphans = await find_orphans(services)
    assert {elsewhere, unowned} <= {r.uid for r in orphans}
    for orphan in orphans:
        if orphan.uid in (elsewhere, unowned):
            await delete(services, orphan)


async def test_a_failed_mljob_listing_skips_the_sweep(
    stack: StackEnv, kubectl: Kubectl, namespace: str, services: Services
) -> None:
    """A service account that may list MLJobs in the test namespace only, like a misconfigured
    operator: the LIST of the second namespace is refused (403), so nothing may be removed."""
    kubectl.run("-n", namespace, "create", "serviceaccount", "sweeper")
    kubectl.run("-n", namespace, "create", "role", "lister", "--verb=list", "--resource=mljobs.mljob.dev")
    kubectl.run(
        "-n", namespace, "create", "rolebinding", "sweeper",
        "--role=lister", f"--serviceaccount={namespace}:sweeper",
    )  # fmt: skip
    token = kubectl.run("-n", namespace, "create", "token", "sweeper").stdout.strip()
    wait_for(
        lambda: kubectl.run("-n", namespace, "get", "mljobs", token=token, check=False).returncode == 0,
        30,
        what="the RoleBinding to take effect",
    )
    limited = Kube(kube_config.new_client_from_config(config_file=kubectl._token_kubeconfig(token)))
    admin = services.kube
    uid = await plant(services, PIPELINE, namespace)
    services.kube = limited
    services.settings.namespaces = [namespace, "kube-system"]

    report = await sweep_orphans(services)

    assert report.skipped is not None and "403" in report.skipped, report.skipped
    assert report.removed == []
    assert await present(services, uid) == ALL
    # The same credentials sweep once every watched namespace can be listed.
    services.settings.namespaces = [namespace]
    assert (await sweep_orphans(services)).skipped is None
    assert await present(services, uid) == NONE
    services.kube = admin


async def test_chaos_flush_state_and_delete_stream(
    stack: StackEnv, kubectl: Kubectl, namespace: str, services: Services
) -> None:
    uid = live_job(kubectl, namespace, "victim")
    await plant(services, PIPELINE, namespace, uid=uid)

    flushed = await asyncio.to_thread(chaos, stack, services, "flush-state", f"{namespace}/victim")
    assert uid in flushed.stdout
    assert await present(services, uid) == {"consumer": True, "registry": True, "redis": False}
    assert await services.state.counts(uid) is None

    deleted = await asyncio.to_thread(
        chaos, stack, services, "delete-stream", f"{namespace}/victim", "--consumer-only"
    )
    assert protocol.task_consumer(uid) in deleted.stdout
    assert await present(services, uid) == {"consumer": False, "registry": True, "redis": False}
    assert await jetstream.pipeline_stream_exists(services.js, PIPELINE)

    await plant(services, PIPELINE, namespace, uid=uid)  # a bare --uid finds the pipeline in NATS
    deleted = await asyncio.to_thread(chaos, stack, services, "delete-stream", "--uid", uid)
    assert protocol.task_stream(PIPELINE) in deleted.stdout
    assert not await jetstream.pipeline_stream_exists(services.js, PIPELINE)
    assert (await present(services, uid))["consumer"] is False


async def test_chaos_list_orphans_is_a_dry_run(stack: StackEnv, namespace: str, services: Services) -> None:
    uid = await plant(services, PIPELINE, namespace)

    listed = await asyncio.to_thread(
        chaos, stack, services, "list-orphans", "--namespace", namespace, "--grace=0"
    )

    assert listed.stdout.count(uid) == 3, listed.stdout  # stream, registry entry, Redis keys
    assert await present(services, uid) == ALL


async def test_a_job_created_during_the_sweep_is_never_taken_for_an_orphan(
    kubectl: Kubectl, namespace: str, services: Services
) -> None:
    """Observe first, list second: a job whose MLJob and resources appear right after the LIST
    snapshot was taken has no observed resource, so nothing of it can be removed."""
    real_list = services.kube.list_jobs
    created: list[str] = []

    async def list_then_create(namespaces: list[str] | None) -> list[dict[str, object]]:
        jobs = await real_list(namespaces)
        uid = await asyncio.to_thread(live_job, kubectl, namespace, "newborn")
        created.append(await plant(services, PIPELINE, namespace, uid=uid))
        return jobs  # the snapshot from before the job existed

    services.kube.list_jobs = list_then_create  # type: ignore[method-assign]
    report = await sweep_orphans(services)

    assert report.skipped is None and created
    assert await present(services, created[0]) == ALL


async def test_only_redis_keys_no_live_job_owns_are_asked_their_age(
    kubectl: Kubectl, namespace: str, services: Services
) -> None:
    """With ten thousand live jobs, one OBJECT IDLETIME per key per sweep was most of an idle
    operator's Redis traffic: the age decides only for keys no live MLJob owns."""
    live = live_job(kubectl, namespace, "aged-live")
    await plant(services, PIPELINE, namespace, uid=live)
    orphan = await plant(services, PIPELINE, namespace)
    seen, orphans = await find_orphans(services)
    ages = {r.uid: r.age for r in seen.resources if r.kind is Kind.REDIS}
    assert ages[live] is None
    assert ages[orphan] is not None and ages[orphan] >= 0
    assert {r.uid for r in orphans} == {orphan}
