"""mljob.client's pure parts, table-driven (1 of 2): the submission and retry manifests (items
inline or in ConfigMaps, the link to the original), rate and ETA from samples, the CLI's
arguments. The other half (tables, the status screen, the runbook, progress bars, output
writers, the API's refusals) is test_client_format.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mljob.api.models import MAX_INLINE_ITEMS
from mljob.cli import plugin
from mljob.cli.main import build_parser
from mljob.client import manifests
from mljob.client.errors import UsageError
from mljob.client.manifests import RETRY_ITEMS, RETRY_OF, RETRY_OF_UID, RETRY_REASON
from mljob.client.rate import (
    Rate,
    SampleLog,
    add,
    average_since,
    eta,
    format_duration,
    format_rate,
    from_throughput,
    rate,
)

pytestmark = pytest.mark.unit

UID = "0b3f9a52-6d3e-4f8e-9b57-3c1d2a4e5f60"


def original(**spec: Any) -> dict[str, Any]:
    """An MLJob as the apiserver returns it, with what a retry must not carry over."""
    return {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {
            "name": "thumbs",
            "namespace": "team-a",
            "uid": UID,
            "resourceVersion": "4711",
            "generation": 2,
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "labels": {"team": "vision", RETRY_OF: "older"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
            "finalizers": ["mljob.dev/cleanup"],
        },
        "spec": {
            "pipeline": "thumbnails",
            "items": ["a", "b", "c"],
            "params": {"size": 64},
            "maxDeliver": 3,
            "failureThreshold": 0.2,
            "cancel": True,
            **spec,
        },
        "status": {"phase": "Succeeded", "processed": 3, "failed": 2},
    }


# ------------------------------------------------------------------------------------ retry


@pytest.mark.parametrize(
    ("reason", "items", "inline"),
    [
        (None, [{"id": "a"}, {"id": "c"}], ["a", "c"]),
        ("MaxDeliveriesExceeded", [{"id": "a", "url": "s3://a"}], [{"id": "a", "url": "s3://a"}]),
    ],
)
def test_a_retry_copies_the_spec_replaces_the_items_and_links_to_the_original(
    reason: str | None, items: list[dict[str, Any]], inline: list[Any]
) -> None:
    made = manifests.retry(original(), items, reason, name="thumbs-retry-bcdfg")
    job = made.job
    assert made.configmaps == [] and made.name == "thumbs-retry-bcdfg"
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}  # no status
    assert job["spec"] == {
        "pipeline": "thumbnails",
        "items": inline,
        "params": {"size": 64},
        "maxDeliver": 3,
        "failureThreshold": 0.2,
    }  # cancel dropped, items replaced, the rest copied
    meta = job["metadata"]
    assert set(meta) == {"name", "labels", "annotations"}  # no uid, resourceVersion, finalizers
    assert meta["labels"] == {"team": "vision", RETRY_OF: "thumbs", RETRY_OF_UID: UID}
    expected = {RETRY_OF: "team-a/thumbs", RETRY_OF_UID: UID, RETRY_ITEMS: str(len(items))}
    if reason:
        expected[RETRY_REASON] = reason
    assert meta["annotations"] == expected  # the original's own annotations are not copied


def test_a_retry_of_items_from_a_source_replaces_the_source() -> None:
    made = manifests.retry(original(items=None, itemsFrom={"url": "https://x/m.jsonl"}), [{"id": "z"}])
    assert "itemsFrom" not in made.job["spec"] and made.job["spec"]["items"] == ["z"]


def test_a_long_name_is_linked_by_annotation_and_uid_only() -> None:
    body = original()
    body["metadata"]["name"] = "n" * 70
    meta = manifests.retry(body, [{"id": "a"}]).job["metadata"]
    assert RETRY_OF not in meta["labels"] and meta["labels"][RETRY_OF_UID] == UID
    assert meta["annotations"][RETRY_OF] == "team-a/" + "n" * 70
    assert len(meta["name"]) <= 63


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("thumbs", "thumbs-retry-bcdfg"),
        ("thumbs-retry-x2k9q", "thumbs-retry-bcdfg"),  # a retry of a retry: no growing chain
        ("a" * 60, "a" * 51 + "-retry-bcdfg"),  # 63 characters, a DNS label
        ("a" * 50 + "-b", "a" * 50 + "-retry-bcdfg"),  # cut, and never a '-' before the tail
    ],
)
def test_generated_names(base: str, expected: str) -> None:
    assert manifests.generated_name(base, "bcdfg") == expected
    assert len(manifests.generated_name(base)) == len(expected)


def test_more_items_than_fit_inline_go_into_configmaps_of_json_lines() -> None:
    items = [{"id": f"i-{n:05d}", "url": f"https://x/{n}"} for n in range(MAX_INLINE_ITEMS + 1)]
    made = manifests.retry(original(), items, name="big-retry-bcdfg")
    spec = made.job["spec"]
    assert "items" not in spec
    assert spec["itemsFrom"] == {"configMaps": [cm["metadata"]["name"] for cm in made.configmaps]}
    assert [cm["metadata"]["name"] for cm in made.configmaps] == ["big-retry-bcdfg-items-0"]
    text = made.configmaps[0]["data"]["items.jsonl"]
    assert [json.loads(line) for line in text.splitlines()] == items
    assert made.configmaps[0]["metadata"]["labels"] == {manifests.ITEMS_OF: "big-retry-bcdfg"}


@pytest.mark.parametrize(
    ("count", "max_inline", "inline"),
    [(3, MAX_INLINE_ITEMS, True), (3, 2, False), (MAX_INLINE_ITEMS, MAX_INLINE_ITEMS, True)],
)
def test_the_inline_limit(count: int, max_inline: int, inline: bool) -> None:
    made = manifests.submission("j", "p", [f"i{n}" for n in range(count)], max_inline=max_inline)
    assert ("items" in made.job["spec"]) is inline and bool(made.configmaps) is not inline


def test_configmaps_stay_under_the_object_limit() -> None:
    items = [{"id": f"i-{n:06d}", "pad": "x" * 200} for n in range(12_000)]
    chunks = manifests.configmap_chunks(items)
    assert len(chunks) == 3 and all(len(c.encode()) <= manifests.MAX_CONFIGMAP_BYTES for c in chunks)
    assert sum(len(c.splitlines()) for c in chunks) == len(items)
    with pytest.raises(UsageError, match="alone is"):
        manifests.configmap_chunks([{"id": "huge", "pad": "x" * manifests.MAX_CONFIGMAP_BYTES}])


@pytest.mark.parametrize(
    ("kwargs", "spec"),
    [
        (
            {"params": {"a": 1}, "max_deliver": 4},
            {"pipeline": "p", "items": ["x"], "params": {"a": 1}, "maxDeliver": 4},
        ),
        ({"failureThreshold": 0.1}, {"pipeline": "p", "items": ["x"], "failureThreshold": 0.1}),
        ({"ack_wait_seconds": None}, {"pipeline": "p", "items": ["x"]}),
    ],
)
def test_a_submission_takes_spec_fields_by_either_name(kwargs: dict[str, Any], spec: dict[str, Any]) -> None:
    assert manifests.submission("j", "p", ["x"], **kwargs).job["spec"] == spec


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"items": ["a", "a"]}, "duplicate item id 'a' (items 0 and 1)"),
        ({"items": [{"url": "x"}]}, "items[0]: an item object needs a string `id`"),
        ({"items": []}, "the job has no items"),
        ({}, "give the items, or the URL"),
        ({"items": ["a"], "url": "https://x"}, "give the items, or the URL"),
        ({"url": "ftp://x"}, "url: an http(s) URL expected"),
        ({"items": ["a"], "max_retries": 3}, "max_retries: not a field of an MLJob's spec"),
    ],
)
def test_a_submission_refuses_what_the_apiserver_would(args: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as err:
        manifests.submission("j", "p", **args)
    assert str(err.value).startswith(message)


def test_a_submission_from_a_url() -> None:
    made = manifests.submission("j", "p", url="https://x/m.jsonl", sha256="ab" * 32, labels={"t": "1"})
    assert made.job["spec"]["itemsFrom"] == {"url": "https://x/m.jsonl", "sha256": "ab" * 32}
    assert made.job["metadata"] == {"name": "j", "labels": {"t": "1"}}


# ------------------------------------------------------------------------------------ rate and ETA


@pytest.mark.parametrize(
    ("samples", "now", "expected"),
    [
        ([], 100.0, None),
        ([(100.0, 50)], 100.0, None),  # one sample, no span
        ([(40.0, 0), (100.0, 600)], 100.0, Rate(10.0, 60.0)),
        ([(50.0, 0), (80.0, 300), (100.0, 500)], 100.0, Rate(10.0, 50.0)),
        # the latest count stands until now: a job that stopped decays to 0
        ([(40.0, 0), (70.0, 300)], 100.0, Rate(5.0, 60.0)),
        ([(10.0, 100), (20.0, 200)], 100.0, Rate(0.0, 80.0)),
        # nothing older in the window: from the last sample before it, over the longer span
        ([(0.0, 0), (99.5, 1000)], 100.0, Rate(10.0, 100.0)),
        ([(40.0, 10), (100.0, 5)], 100.0, Rate(0.0, 60.0)),  # never negative (a recreated count)
        ([(200.0, 5)], 100.0, None),  # samples from the future are ignored
    ],
)
def test_rate_over_the_last_minute(
    samples: list[tuple[float, int]], now: float, expected: Rate | None
) -> None:
    assert rate(samples, now) == expected


def t(seconds: int) -> str:
    return f"1970-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}Z"


def points(width: int, counts: list[tuple[int, int]]) -> list[dict[str, Any]]:
    return [{"start": t(n * width), "succeeded": ok, "failed": bad} for n, (ok, bad) in enumerate(counts)]


@pytest.mark.parametrize(
    ("buckets", "end", "expected"),
    [
        ([], t(100), None),
        # 5 s buckets from 0 to 100: those from 40 on (twelve and the one just begun) cover the minute
        (points(5, [(5, 0)] * 20 + [(4, 1)]), t(100), Rate(65 / 60, 60.0)),
        (points(5, [(50, 0)] * 8 + [(0, 0)] * 13), t(100), Rate(0.0, 60.0)),  # it stopped 60 s ago
        (points(5, [(30, 0)]), t(3), Rate(10.0, 3.0)),  # a job younger than the window: since its start
        (points(5, [(30, 0)]), t(0), None),  # no span yet
        # wide buckets (a long job): as many as cover the minute, over their longer span
        (points(120, [(600, 0), (90, 30)]), t(150), Rate(720 / 150, 150.0)),
        (points(120, [(600, 0), (90, 30), (60, 0)]), t(300), Rate(60 / 60, 60.0)),
    ],
)
def test_rate_from_the_apis_throughput(
    buckets: list[dict[str, Any]], end: str, expected: Rate | None
) -> None:
    got = from_throughput(buckets, end)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.seconds == expected.seconds
        assert got.per_second == pytest.approx(expected.per_second)


@pytest.mark.parametrize(
    ("remaining", "current", "expected"),
    [
        (0, None, 0.0),
        (100, None, None),
        (100, Rate(0.0, 60), None),
        (100, Rate(4.0, 60), 25.0),
        (-3, Rate(4.0, 60), 0.0),
    ],
)
def test_eta(remaining: int, current: Rate | None, expected: float | None) -> None:
    assert eta(remaining, current) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (8.4, "8s"),
        (59.6, "1m00s"),
        (245, "4m05s"),
        (7380, "2h03m"),
        (3 * 86400 + 4 * 3600, "3d4h"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0/s"), (0.05, "3.0/min"), (2.345, "2.3/s"), (1234.5, "1,234/s")]
)
def test_format_rate(value: float, text: str) -> None:
    assert format_rate(value) == text


def test_average_since_start_and_the_sample_log(tmp_path: Path) -> None:
    assert average_since("1970-01-01T00:01:40Z", 500, 150.0) == Rate(10.0, 50.0, since_start=True)
    assert average_since(None, 5, 1.0) is None and average_since("not a time", 5, 1.0) is None
    assert add([(1.0, 1), (500.0, 9)], (600.0, 10), keep=300) == [(500.0, 9), (600.0, 10)]
    log = SampleLog(UID, tmp_path)
    assert log.read() == []
    log.record(10, now=1000.0)
    assert log.record(70, now=1030.0) == [(1000.0, 10), (1030.0, 70)]
    assert rate(SampleLog(UID, tmp_path).read(), 1030.0) == Rate(2.0, 30.0)
    log.path.write_text("{broken")
    assert log.read() == []


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["items", "j", "--failed"], {"name": "j", "outcome": "failed", "reason": None, "output": "table"}),
        (
            ["items", "j", "--reason", "Lost", "-o", "csv"],
            {"outcome": None, "reason": "Lost", "output": "csv"},
        ),
        (
            ["items", "j", "--pending", "--limit", "5", "--after", "YQ"],
            {"outcome": "pending", "limit": 5, "after": "YQ"},
        ),
        (["status", "j", "-n", "team-a", "-o", "wide"], {"namespace": "team-a", "output": "wide"}),
        (["retry", "j", "--reason", "Lost", "--dry-run", "-o", "yaml"], {"reason": "Lost", "dry_run": True}),
        (["results", "j", "-o", "parquet", "--output", "r.pq"], {"format": "parquet", "file": "r.pq"}),
        (["results", "j"], {"format": "jsonl", "file": None}),
        (["watch", "-A"], {"names": [], "all_namespaces": True}),
        (["watch", "a", "b", "--interval", "0.5"], {"names": ["a", "b"], "interval": 0.5}),
        (["cancel", "j", "--wait", "--kubeconfig", "k", "--context", "c"], {"wait": True, "kubeconfig": "k"}),
        (["status", "j", "--api-url", "http://x", "--token", "t"], {"api_url": "http://x", "token": "t"}),
    ],
)
def test_arguments(argv: list[str], expected: dict[str, Any]) -> None:
    args = vars(build_parser().parse_args(argv))
    assert {key: args[key] for key in expected} == expected
    assert {
        key: value for key, value in vars(plugin.build_parser().parse_args(argv)).items() if key in expected
    } == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["items", "j", "--failed", "--pending"],
        ["items", "j", "-o", "parquet"],
        ["items", "j", "--limit", "0"],
        ["results", "j", "-o", "json"],
        ["status"],
        ["cancel", "a", "b"],
    ],
)
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2


@pytest.mark.parametrize(
    ("argv", "hoisted"),
    [
        (["-n", "ns", "status", "j"], ["status", "-n", "ns", "j"]),
        (
            ["--namespace=ns", "--context", "c", "items", "j"],
            ["items", "--namespace=ns", "--context", "c", "j"],
        ),
        (["-A", "watch"], ["watch", "-A"]),
        (["status", "j", "-n", "ns"], ["status", "j", "-n", "ns"]),
        (["-n", "ns", "bogus"], ["-n", "ns", "bogus"]),  # not a command: argparse says so
        (["--help"], ["--help"]),
    ],
)
def test_kubectl_users_put_flags_first(argv: list[str], hoisted: list[str]) -> None:
    assert plugin.hoist(argv) == hoisted
