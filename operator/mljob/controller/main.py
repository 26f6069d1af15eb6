"""Run the operator: kopf embedded, with the health server, until it stops."""

from __future__ import annotations

import asyncio
import logging
import zlib

from mljob.settings import OperatorSettings, default_worker_id


def run_operator(config: OperatorSettings) -> int:
    """Exit status 1 when start-up met a failure retrying cannot heal (kopf logged why)."""
    import kopf

    import mljob.controller.handlers  # noqa: F401 - registers the handlers
    from mljob.ops import logs
    from mljob.ops.health import HealthServer, Readiness

    logs.setup(config.log_level, config.log_format)
    readiness = Readiness()
    memo = kopf.Memo(config=config, readiness=readiness)
    priority = peering_priority(config)
    if config.peering:
        logging.getLogger("mljob.operator").info(
            "kopf peering %r with priority %d", config.peering_name, priority
        )

    async def main() -> None:
        server = HealthServer(config.metrics_port, readiness)
        await server.start()
        try:
            await kopf.operator(
                clusterwide=not config.namespaces,
                namespaces=config.namespaces,
                standalone=not config.peering,
                # Given at all, these make kopf wait for the peering CRDs: only with --peering.
                priority=priority if config.peering else None,
                peering_name=config.peering_name if config.peering else None,
                liveness_endpoint=config.liveness_endpoint,
                memo=memo,
            )
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except Exception as err:
        if not cannot_start(err):
            raise
        return 1  # kopf logged the startup handler's PermanentError: the one line saying why
    return 0


def cannot_start(err: BaseException) -> bool:
    """Whether kopf stopped because start-up met a failure that retrying cannot heal."""
    from mljob.transport.natsconn import CannotStart

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, CannotStart):
            return True
        seen = seen.__cause__
    return False


def peering_priority(config: OperatorSettings) -> int:
    """The configured priority, else one derived from host name (the pod name) and pid.

    kopf pauses every peer while two live ones share a priority, so HA replicas need distinct
    ones; a Deployment's pods have no ordinal, but distinct names: a 31-bit hash of the name
    makes a tie between a few replicas about a one-in-a-billion event.
    """
    if config.priority is not None:
        return config.priority
    if not config.peering:
        return 0
    return zlib.crc32(default_worker_id().encode()) & 0x7FFFFFFF
