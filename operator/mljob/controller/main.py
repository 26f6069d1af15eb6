"""Run the operator: kopf embedded, with the health server and leader election, until it stops."""

from __future__ import annotations

import asyncio

from mljob.controller.leader import Leadership
from mljob.settings import OperatorSettings, default_worker_id


def run_operator(config: OperatorSettings) -> int:
    """Exit status 1 when start-up met a failure retrying cannot heal (kopf logged why)."""
    import kopf

    import mljob.controller.handlers  # noqa: F401 - registers the handlers
    from mljob.ops import logs
    from mljob.ops.health import HealthServer, Readiness

    logs.setup(config.log_level, config.log_format)
    readiness = Readiness()
    # In the memo before kopf starts: the handlers and the scheduler read memo.leadership.
    leadership = make_leadership(config)
    memo = kopf.Memo(config=config, readiness=readiness, leadership=leadership)

    async def main() -> None:
        server = HealthServer(config.metrics_port, readiness)
        await server.start()
        stop = asyncio.Event()
        electing = asyncio.create_task(leadership.run(stop), name="leader-election")
        try:
            # Always standalone: every replica watches (its index stays warm); only the
            # Lease holder reconciles, whatever kopf peering would have paused.
            await kopf.operator(
                clusterwide=not config.namespaces,
                namespaces=config.namespaces,
                standalone=True,
                liveness_endpoint=config.liveness_endpoint,
                memo=memo,
            )
        finally:
            stop.set()  # a leader releases the Lease: a standby takes over at its next try
            try:
                await asyncio.wait_for(electing, config.renew_deadline_seconds + 1)
            except TimeoutError:
                pass  # the lease expires instead
            finally:
                leadership.close()
            await server.stop()

    try:
        asyncio.run(main())
    except Exception as err:
        if not cannot_start(err):
            raise
        return 1  # kopf logged the startup handler's PermanentError: the one line saying why
    return 0


def make_leadership(config: OperatorSettings) -> Leadership:
    """Leadership.always() for one replica; with --leader-elect, the Lease, through a Kube
    adapter of its own (two threads: renewals never queue behind the reconcile's calls)."""
    if not config.leader_election:
        return Leadership.always(default_worker_id())
    from mljob.adapters.kube import Kube, load_config
    from mljob.core.leases import Timing

    return Leadership(
        Kube(load_config(2), threads=2),
        default_worker_id(),
        name=config.lease_name,
        namespace=config.lease_namespace,
        timing=Timing(
            config.lease_duration_seconds, config.renew_deadline_seconds, config.retry_period_seconds
        ),
    )


def cannot_start(err: BaseException) -> bool:
    """Whether kopf stopped because start-up met a failure that retrying cannot heal."""
    from mljob.transport.natsconn import CannotStart

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, CannotStart):
            return True
        seen = seen.__cause__
    return False
