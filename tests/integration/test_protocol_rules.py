"""The decoding rules docs/protocol.md states, table by table, on raw JSON bodies (pure: no server).

Bodies are written as JSON text, not built from dicts, so `2.0`, `1e3` and `true` reach the
decoder exactly as a worker in another language would send them. What a worker and the
collector then do with each error (fail + TERM, fail + ACK, dead letter) is tested against the
real servers in tests/integration/test_worker.py and tests/integration/test_collector_refusals.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nats.aio.msg import Msg

from mljob import protocol

JOB = '{"uid": "u-1", "namespace": "ns", "name": "job", "pipeline": "p"}'


def task(version: str = "2", item: str = '{"id": "img-1"}', extra: str = "") -> bytes:
    fields = [f'"job": {JOB}', f'"item": {item}']
    if version:
        fields.insert(0, f'"version": {version}')
    return ("{" + ", ".join(fields) + extra + "}").encode()


def result(version: str = "2", extra: str = "") -> bytes:
    fields = ['"job_uid": "u-1"', '"item_id": "img-1"', '"outcome": "succeeded"']
    if version:
        fields.insert(0, f'"version": {version}')
    return ("{" + ", ".join(fields) + extra + "}").encode()


Decode = Callable[[bytes], object]
Body = Callable[..., bytes]
BOTH = [(protocol.decode_task, task), (protocol.decode_result, result)]
VERSION_REFUSED = r"^unsupported protocol version .+ \(this side speaks 2\)$"
NOT_A_STRING_ID = r"^invalid task: item\.id must be a non-empty string"

#: `version` values that are present but not the JSON integer 2: refused, never "malformed".
REFUSED_VERSIONS = ["1", "3", "99", '"2"', "2.0", "2e0", "true", "false", "null", "[2]", '{"v": 2}', '"v2"']


@pytest.mark.parametrize("version", REFUSED_VERSIONS)
@pytest.mark.parametrize(("decode", "body"), BOTH)
def test_a_version_other_than_the_integer_2_is_refused(decode: Decode, body: Body, version: str) -> None:
    with pytest.raises(protocol.UnsupportedVersion, match=VERSION_REFUSED):
        decode(body(version))


@pytest.mark.parametrize(
    ("version", "quoted"), [('"2"', '"2"'), ("2.0", "2.0"), ("true", "true"), ("null", "null"), ("3", "3")]
)
def test_the_refusal_quotes_the_version_as_json(version: str, quoted: str) -> None:
    with pytest.raises(protocol.UnsupportedVersion) as refused:
        protocol.decode_task(task(version))
    assert str(refused.value) == f"unsupported protocol version {quoted} (this side speaks 2)"


@pytest.mark.parametrize(("decode", "body"), BOTH)
def test_a_missing_version_is_malformed_not_refused(decode: Decode, body: Body) -> None:
    with pytest.raises(protocol.MalformedMessage) as err:
        decode(body(version=""))
    assert not isinstance(err.value, protocol.UnsupportedVersion)
    assert "version" in str(err.value)


def test_a_wrong_version_wins_over_every_other_problem() -> None:
    """Refused "before anything else in it is looked at": another version may shape it otherwise."""
    with pytest.raises(protocol.UnsupportedVersion):
        protocol.decode_task(b'{"version": "2", "job": 5, "item": []}')
    with pytest.raises(protocol.UnsupportedVersion):
        protocol.decode_result(b'{"version": 2.0, "outcome": "maybe"}')


@pytest.mark.parametrize(
    ("params", "expected"), [("", {}), (', "params": null', {}), (', "params": {"size": 256}', {"size": 256})]
)
def test_params_absent_or_null_is_empty(params: str, expected: dict[str, object]) -> None:
    assert protocol.decode_task(task(extra=params)).params == expected


@pytest.mark.parametrize("params", ["[]", '"x"', "1", "true"])
def test_params_of_another_type_is_malformed(params: str) -> None:
    with pytest.raises(protocol.MalformedMessage) as err:
        protocol.decode_task(task(extra=f', "params": {params}'))
    assert not isinstance(err.value, protocol.UnsupportedVersion)


@pytest.mark.parametrize("item_id", ['"img-1"', '"1e3"', '"1.5"', '"42"', '" spaced "', '"ünï"'])
def test_an_item_id_string_is_taken_exactly(item_id: str) -> None:
    decoded = protocol.decode_task(task(item=f'{{"id": {item_id}, "url": "s3://b/k"}}'))
    assert decoded.item_id == item_id[1:-1]
    assert decoded.item == {"id": item_id[1:-1], "url": "s3://b/k"}


@pytest.mark.parametrize("item_id", ["42", "1.5", "1e3", "-0", "true", "null", '""', "[1]", '{"a": 1}'])
def test_an_item_id_that_is_not_a_non_empty_string_is_malformed(item_id: str) -> None:
    with pytest.raises(protocol.MalformedMessage, match=NOT_A_STRING_ID):
        protocol.decode_task(task(item=f'{{"id": {item_id}}}'))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        task(item="{}"),
        task(item='"img-1"'),
        b'{"version": 2, "item": {"id": "a"}}',
    ],
)
def test_bodies_that_are_not_a_task_are_malformed(body: bytes) -> None:
    with pytest.raises(protocol.MalformedMessage) as err:
        protocol.decode_task(body)
    assert not isinstance(err.value, protocol.UnsupportedVersion)


def test_unknown_fields_are_ignored() -> None:
    decoded = protocol.decode_task(task(item='{"id": "a", "x": 1}', extra=', "future": {"k": true}'))
    assert (decoded.item_id, decoded.item["x"]) == ("a", 1)
    assert protocol.decode_result(result(extra=', "future": 1')).item_id == "img-1"


@pytest.mark.parametrize("attempts", ['"2"', "2.0", "true", "0", "-1", "1.5"])
def test_result_attempts_is_an_integer_of_at_least_1(attempts: str) -> None:
    with pytest.raises(protocol.MalformedMessage) as err:
        protocol.decode_result(result(extra=f', "attempts": {attempts}'))
    assert not isinstance(err.value, protocol.UnsupportedVersion)


@pytest.mark.parametrize(
    "fields",
    [
        '"job_uid": "u", "item_id": 42, "outcome": "failed"',
        '"job_uid": "u", "item_id": "", "outcome": "failed"',
        '"job_uid": "", "item_id": "a", "outcome": "failed"',
        '"job_uid": "u", "item_id": "a", "outcome": "maybe"',
        '"job_uid": "u", "item_id": "a", "outcome": "failed", "error": 5',
    ],
)
def test_results_with_a_field_of_the_wrong_type_are_malformed(fields: str) -> None:
    with pytest.raises(protocol.MalformedMessage) as err:
        protocol.decode_result(f'{{"version": 2, {fields}}}'.encode())
    assert not isinstance(err.value, protocol.UnsupportedVersion)


def test_result_defaults() -> None:
    decoded = protocol.decode_result(result())
    assert (decoded.result, decoded.error, decoded.attempts, decoded.worker) == (None, None, 1, None)
    assert decoded.finished_at.tzinfo is not None


def test_a_nul_in_a_result_decodes_it_is_postgres_that_refuses_it() -> None:
    """The wire allows `\\u0000`; the collector records the item failed as ResultRejected
    (tests/integration/test_collector_rejected.py), so a decoder must not drop the result here."""
    decoded = protocol.decode_result(result(extra=', "result": {"text": "a\\u0000b"}'))
    assert decoded.result == {"text": "a\x00b"}


def test_subjects_and_ids() -> None:
    """The Names table of docs/protocol.md."""
    uid = "3f0c5a2e-8d1b-4c1e-9a57-2b6f1d0e9c44"
    assert protocol.task_stream("resize") == "MLJOB_TASKS_resize"
    assert protocol.task_stream_subjects("resize") == "mljob.tasks.resize.*"
    assert protocol.task_subject("resize", uid) == f"mljob.tasks.resize.{uid}"
    assert protocol.task_consumer(uid) == f"workers-{uid}"
    assert protocol.registry_key("resize", uid) == f"resize.{uid}"
    assert protocol.results_subject("resize", uid) == f"mljob.results.resize.{uid}"
    assert protocol.heartbeat_subject("resize", uid) == f"mljob.heartbeat.resize.{uid}"
    assert protocol.drained_subject(uid) == f"mljob.events.drained.{uid}"
    assert protocol.task_msg_id(uid, "img-00042") == f"{uid}:img-00042"
    assert protocol.result_msg_id(uid, "img-00042") == f"result:{uid}:img-00042"
    assert protocol.parse_results_subject(f"mljob.results.resize.{uid}") == ("resize", uid)
    assert protocol.parse_results_subject(f"mljob.results.{uid}") is None


V1 = "$JS.ACK.MLJOB_TASKS_p.workers-u.3.41.7.1700000000000000000.12"
V2 = "$JS.ACK._.ACCHASH.MLJOB_TASKS_p.workers-u.3.41.7.1700000000000000000.12"


@pytest.mark.parametrize(
    ("reply", "domain"),
    [(V1, None), (V2, None), (V2 + ".a1b2c3", None), (V2.replace("._.", ".hub."), "hub")],
    ids=["v1: 9 tokens", "v2: 11 tokens", "v2 with the trailing token", "v2 with a domain"],
)
def test_the_delivery_count_is_read_by_position_from_the_front(reply: str, domain: str | None) -> None:
    """The reference worker's parse of the ack subject (nats-py's, the same as nats.go's): 9
    tokens is v1, 11 or more is v2 (domain `_` is none), any token after the 11th is ignored."""
    metadata = Msg(_client=None, subject="mljob.tasks.p.u", reply=reply).metadata  # type: ignore[arg-type]
    assert (metadata.stream, metadata.consumer) == ("MLJOB_TASKS_p", "workers-u")
    assert (metadata.num_delivered, metadata.sequence.stream, metadata.sequence.consumer) == (3, 41, 7)
    assert metadata.num_pending == 12
    assert (metadata.domain or None) == domain


@pytest.mark.parametrize("reply", ["$JS.ACK.s.c.3.41.7.1700000000000000000", V1 + ".x", "_INBOX.abc"])
def test_an_ack_subject_of_another_length_has_no_metadata(reply: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises its NotJSMessageError
        _ = Msg(_client=None, subject="mljob.tasks.p.u", reply=reply).metadata  # type: ignore[arg-type]
