"""Pure decisions about one task: what its outcome means (publish, retry, refuse), retry delays,
exhaustion, id recovery, result bounds, publish retry."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticSerializationError

from mljob import protocol
from mljob.worker.context import PermanentError

#: Upper bound of the NAK delay for a transient handler failure.
MAX_NAK_DELAY_SECONDS = 30
#: Error texts are clipped so a failed result stays far below MAX_RESULT_BYTES.
MAX_ERROR_CHARS = 4000
TASK_SUBJECT_PREFIX = "mljob.tasks."


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish `result`; once the stream has stored it, ACK the task (TERM it when `term`: refused)."""

    result: protocol.Result
    term: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """No result: NAK the task for redelivery after `delay` seconds (its handler failed transiently)."""

    delay: int
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """No result: TERM the task (unusable, and not attributable to any item)."""


Decision = Publish | Retry | Refuse


def after_value(value: Any, uid: str, item_id: str, attempt: int, max_deliver: int, worker: str) -> Decision:
    """What a handler's value (or, from a batch handler, an exception instance) means for its task."""
    if isinstance(value, BaseException):
        return after_error(value, uid, item_id, attempt, max_deliver, worker)
    return Publish(succeeded_result(uid, item_id, value, attempt, worker))


def after_error(
    err: BaseException, uid: str, item_id: str, attempt: int, max_deliver: int, worker: str
) -> Decision:
    """What a handler's exception means (docs/protocol.md, "Acknowledgement rules"): a
    PermanentError fails the item now; any other is retried with a growing delay, and fails the
    item on the last delivery."""
    if isinstance(err, PermanentError):
        return Publish(failed_result(uid, item_id, str(err) or "PermanentError", attempt, worker))
    reason = describe(err)
    if is_last_delivery(attempt, max_deliver):
        return Publish(failed_result(uid, item_id, exhausted_error(attempt, reason), attempt, worker))
    return Retry(nak_delay(attempt), reason)


def nak_delay(attempt: int) -> int:
    """Seconds before a task whose handler failed transiently on delivery `attempt` comes back."""
    delay: int = min(MAX_NAK_DELAY_SECONDS, 2 ** max(1, attempt))
    return delay


def is_last_delivery(attempt: int, max_deliver: int) -> bool:
    """True when NATS will not deliver the task again (max_deliver <= 0 means unlimited)."""
    return max_deliver > 0 and attempt >= max_deliver


def exhausted_error(attempt: int, error: str) -> str:
    return clip(f"exhausted {attempt} deliveries: {error}")


def describe(err: BaseException) -> str:
    text = str(err)
    return clip(f"{type(err).__name__}: {text}" if text else type(err).__name__)


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 14] + "... (clipped)"


def recover_ids(
    subject: str, headers: Mapping[str, str] | None, body: bytes | None = None
) -> tuple[str, str] | None:
    """(job uid, item id) of a task whose body cannot be used, or None when not recoverable.

    The uid is the last token of `mljob.tasks.<pipeline>.<uid>` (the job's own stream, so it is
    authoritative); the item id comes from the `Nats-Msg-Id` header `<uid>:<item id>` the
    operator sets on every task, else from the body's `item.id` when `body` is given and is a
    JSON object that has one (a task of another protocol version may still say that much).
    """
    if not subject.startswith(TASK_SUBJECT_PREFIX):
        return None
    tokens = subject[len(TASK_SUBJECT_PREFIX) :].split(".")
    if len(tokens) != 2 or not all(tokens):
        return None
    uid = tokens[1]
    msg_id = (headers or {}).get(protocol.MSG_ID_HEADER, "")
    prefix = f"{uid}:"
    if msg_id.startswith(prefix) and len(msg_id) > len(prefix):
        return uid, msg_id[len(prefix) :]
    item_id = _body_item_id(body) if body is not None else None
    return (uid, item_id) if item_id else None


def _body_item_id(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    item = data.get("item") if isinstance(data, dict) else None
    item_id = item.get("id") if isinstance(item, dict) else None
    return None if item_id is None or isinstance(item_id, dict | list) else str(item_id)


def failed_result(uid: str, item_id: str, error: str, attempt: int, worker: str) -> protocol.Result:
    return protocol.Result(
        job_uid=uid,
        item_id=item_id,
        outcome=protocol.Outcome.FAILED,
        error=clip(error),
        attempts=max(1, attempt),
        worker=worker,
    )


def succeeded_result(uid: str, item_id: str, value: Any, attempt: int, worker: str) -> protocol.Result:
    return protocol.Result(
        job_uid=uid,
        item_id=item_id,
        outcome=protocol.Outcome.SUCCEEDED,
        result=value,
        attempts=max(1, attempt),
        worker=worker,
    )


def encode_bounded(
    result: protocol.Result, limit: int = protocol.MAX_RESULT_BYTES
) -> tuple[bytes, str | None]:
    """The result's body, or a failed result's body when it cannot be sent as is.

    Returns (body, problem): problem is None when the result went out unchanged.
    """
    try:
        body = result.encode()
    except (PydanticSerializationError, ValueError, TypeError) as err:
        problem = f"result is not JSON-serialisable: {describe(err)}"
    else:
        if len(body) <= limit:
            return body, None
        problem = f"result was {len(body)} bytes, over the limit of {limit} bytes"
    replacement = failed_result(result.job_uid, result.item_id, problem, result.attempts, result.worker or "")
    return replacement.encode(), problem


#: The longest wait between two tries of a result's publish: the stream is back (a new leader
#: elected) at most this long before the result is stored.
MAX_PUBLISH_RETRY_DELAY = 2.0


def publish_retry_delay(first_delay: float, tries: int) -> float:
    """Seconds before a result whose publish failed `tries` times is published again: the first
    delay, doubled after each failed try, at most MAX_PUBLISH_RETRY_DELAY."""
    return min(MAX_PUBLISH_RETRY_DELAY, first_delay * 2.0 ** min(tries - 1, 30))
