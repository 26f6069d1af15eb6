"""The REPLACE_CONSUMER action: the job's consumer stopped answering while its stream answers.

Why: on a replicated (limits-retention) task stream each job's consumer has one replica, so it
lives on one NATS server (docs/architecture.md, "Scale"). While that server is down the
consumer's requests time out and its job waits; a server back within
`MLJOB_CONSUMER_REPLACE_SECONDS` brings the consumer back with its state. Past that the server
is taken as lost and the job gets a new consumer under the next generation's name: NATS keeps
the old one's assignment (creating or deleting it times out too), so the old name cannot be
reused. Workers learn the new name from the registry entry and rebind.

The new consumer delivers the job's tasks from the start of the stream: the tasks with a result
are worked again and their results dropped as duplicates (the results stream's `Nats-Msg-Id`,
then the ledger's first outcome), so nothing is counted twice; that is the price of a lost
server, paid only then.

Where the new consumer lands is the meta leader's choice among the stream's servers, and a
server killed without a word is only known to be offline after NATS's orphan timeout (5 x 30 s);
the new consumer can land on the very server that is lost, and its creation then times out. The
next generation is tried at once, each creation given `CREATE_TIMEOUT` (one on a live server
takes milliseconds), for up to `PLACEMENT_BUDGET` seconds, rather than waiting another
`MLJOB_CONSUMER_REPLACE_SECONDS` for the misplaced one to fall silent. A creation JetStream
refuses outright (a 503 while its meta leader is elected) placed nothing: the same name is tried
again a second later. On the clustered test
stack the meta leader was seen to place five tries in a row on the lost server, so the budget
is one of time, not of tries. Each misplaced try is an empty consumer on the lost server: the
job's cleanup deletes it once its server answers again, else the orphan sweep.

Crash-safe: the new generation is written to the status first; a crash before the consumer
exists leaves a status naming a consumer that is missing, which is the REDISPATCH case (the
consumer created, unresolved items re-published, deduplicated, the registry entry written).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from mljob import protocol
from mljob.adapters import jetstream
from mljob.adapters.services import Services
from mljob.controller.actions.redispatch import ensure_stream_and_registry
from mljob.controller.jobview import JobView, target_of

log = logging.getLogger(__name__)

#: Seconds a new consumer's creation may take before it is taken as placed on the lost server.
CREATE_TIMEOUT = 2.0
#: Seconds one replacement keeps trying before it is left to the next detection.
PLACEMENT_BUDGET = 90.0
#: Seconds between tries JetStream refused outright (its meta leader being elected: a 503), which
#: placed nothing, so the same name is tried again.
REFUSED_RETRY_SECONDS = 1.0


async def replace_consumer(services: Services, view: JobView) -> bool:
    """Replace the job's silent consumer; True when the new one answered its creation."""
    old = view.consumer_generation
    new = old + 1
    uid, pipeline = view.ref.uid, view.pipeline
    silent = services.settings.consumer_replace_seconds
    message = (
        f"the job's consumer {protocol.task_consumer(uid, old)} has not answered for over {silent:g}s "
        f"while its stream does (its NATS server is down or lost); replaced by "
        f"{protocol.task_consumer(uid, new)}, which delivers the job's tasks again (results already "
        f"stored are deduplicated)"
    )
    log.warning("job %s/%s (%s): %s", view.ref.namespace, view.ref.name, uid, message)
    await view.set_conditions(
        ("ConsumerAvailable", "False", "Replacing", message),
        extra={"consumerGeneration": new, "diagnostics": view.with_diagnostic("ConsumerReplaced", message)},
    )
    await services.kube.event(view.ref, "ConsumerReplaced", message, warning=True)
    target = await target_of(view)
    deadline = time.monotonic() + PLACEMENT_BUDGET
    while True:
        try:
            entry = await ensure_stream_and_registry(
                services, replace(target, consumer_generation=new), CREATE_TIMEOUT
            )
            break
        except jetstream.NOT_ANSWERING as err:
            if not jetstream.not_answering(err):
                raise
            await jetstream.pipeline_stream_exists(services.js, pipeline)  # raises: NATS itself is away
            misplaced = isinstance(err, TimeoutError)  # else refused: nothing was placed
            out_of_time = time.monotonic() >= deadline
            if misplaced:
                why = "it did not answer: placed on a server that is down and not yet known to be offline"
                then = "trying the next generation"
            else:
                why = f"JetStream refused it for now: {type(err).__name__}: {err}"
                then = "trying again"
            log.warning(
                "job %s: the new consumer %s was not created (%s); %s",
                uid,
                protocol.task_consumer(uid, new),
                why,
                "left to the next detection" if out_of_time else then,
            )
            if out_of_time:
                return False
            if misplaced:
                new += 1
                await view.write({"consumerGeneration": new})  # before it exists: crash-safe as above
            else:
                await asyncio.sleep(REFUSED_RETRY_SECONDS)
    await jetstream.register_job(services.registry, entry)
    if not await jetstream.delete_replaced_consumer(services.js, pipeline, uid, old):
        log.info(
            "job %s: the replaced consumer %s could not be deleted now (its server does not answer); "
            "the job's cleanup tries again",
            uid,
            protocol.task_consumer(uid, old),
        )
    await view.set_conditions(
        ("ConsumerAvailable", "True", "ConsumerReplaced", f"workers pull from {entry.consumer}")
    )
    return True


__all__ = ["replace_consumer"]
