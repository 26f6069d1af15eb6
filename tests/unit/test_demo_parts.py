"""The pieces of `make demo`: the fake model, its manifest, the progress bar, the token
kubeconfig, the report's parsing, and the worker supervisor. No services."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from mljob.api.models import MLJobSpec
from mljob.protocol import JobRef, Task
from mljob.worker import PermanentError, TaskContext
from mljob.worker.handler import BatchSpec, batch_spec
from mljob_dev.demo import kube as demo_kube
from mljob_dev.demo import model as demo
from mljob_dev.demo import progress as demo_progress
from mljob_dev.demo import report as demo_report
from mljob_dev.demo.supervise import Supervisor
from support.waiting import wait_for

pytestmark = pytest.mark.unit


def job(
    name: str, phase: str | None = None, processed: int = 0, failed: int = 0, total: int = 0
) -> dict[str, Any]:
    status = {"phase": phase, "processed": processed, "failed": failed, "total": total} if phase else {}
    return {"metadata": {"name": name}, "status": status}


# ------------------------------------------------------------------ progress bar


def test_bar_reads_like_the_example() -> None:
    line = demo_progress.bar("demo-classify", 3100, 61, 5000, "Running", width=16)
    assert line == "demo-classify [█████████░░░░░░░]  62%  3100/5000  failed 61  Running"


def test_bar_reaches_100_only_when_every_item_has_its_outcome() -> None:
    assert " 99%  4999/5000 " in demo_progress.bar("j", 4999, 0, 5000, "Running")
    full = demo_progress.bar("j", 5000, 3, 5000, "Succeeded", width=10)
    assert full == "j [██████████] 100%  5000/5000  failed 3  Succeeded"


def test_bar_of_a_job_not_counted_yet_is_empty_and_never_overflows() -> None:
    assert demo_progress.bar("j", 0, 0, 0, "Pending", width=4) == "j [░░░░]   0%  0/0  failed 0  Pending"
    assert demo_progress.bar("j", 12, 0, 10, "Running", width=4).startswith("j [████] 100%  10/10")


def test_bar_appends_a_note() -> None:
    assert demo_progress.bar("j", 1, 0, 2, "Running", width=2, note="worker crashes 2").endswith(
        "Running  worker crashes 2"
    )


def test_frame_sorts_aligns_and_shows_a_job_without_status_as_pending() -> None:
    lines = demo_progress.frame([job("b-long-name", "Running", 5, 1, 10), job("a")], width=4)
    assert lines == [
        "a           [░░░░]   0%  0/0  failed 0  Pending",
        "b-long-name [██░░]  50%  5/10  failed 1  Running",
    ]


def test_all_terminal_needs_every_named_job_present_and_finished() -> None:
    jobs = [job("a", "Succeeded"), job("b", "Running")]
    assert demo_progress.all_terminal(jobs, ["a"])
    assert not demo_progress.all_terminal(jobs, ["a", "b"])
    assert not demo_progress.all_terminal(jobs, ["a", "missing"])


def test_painter_redraws_in_place_on_a_terminal_and_appends_lines_otherwise() -> None:
    tty = io.StringIO()
    painter = demo_progress.Painter(tty, tty=True)
    painter.paint(["one", "two"])
    painter.paint(["three", "four"])
    painter.done()
    assert tty.getvalue() == "\rone\x1b[K\ntwo\x1b[K\x1b[1A\rthree\x1b[K\nfour\x1b[K\n"

    narrow = io.StringIO()
    demo_progress.Painter(narrow, tty=True, columns=4).paint(["abcdef"])
    assert narrow.getvalue() == "\rabc\x1b[K", "a wrapped line would break the redraw"

    log = io.StringIO()
    painter = demo_progress.Painter(log, tty=False, columns=4)
    painter.paint(["one-long"])
    painter.paint(["two"])
    painter.done()
    assert log.getvalue() == "one-long\ntwo\n"


def test_watch_stops_at_the_verdict_or_at_the_timeout(tmp_path: Path) -> None:
    states = iter([[], [job("j", "Running", 1, 0, 2)], [job("j", "Succeeded", 2, 0, 2)]])
    out = io.StringIO()
    state = tmp_path / "workers.json"
    state.write_text(json.dumps({"crashes": 2}))
    now = [0.0]
    finished = demo_progress.watch(
        lambda: next(states),
        ["j"],
        demo_progress.Painter(out, tty=False),
        timeout=60,
        state_file=state,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    assert finished
    assert out.getvalue().splitlines()[0] == "(waiting for the MLJob)"
    assert out.getvalue().splitlines()[-1].endswith("2/2  failed 0  Succeeded  worker crashes 2")

    now[0] = 0.0
    stuck = demo_progress.watch(
        lambda: [job("j", "Running", 1, 0, 2)],
        ["j"],
        demo_progress.Painter(io.StringIO(), tty=False),
        timeout=5,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    assert not stuck


def test_crashes_note_tolerates_a_missing_or_half_written_state(tmp_path: Path) -> None:
    assert demo_progress.crashes_note(None) == ""
    assert demo_progress.crashes_note(tmp_path / "none.json") == ""
    (tmp_path / "half.json").write_text('{"cra')
    assert demo_progress.crashes_note(tmp_path / "half.json") == ""
    (tmp_path / "zero.json").write_text('{"crashes": 0}')
    assert demo_progress.crashes_note(tmp_path / "zero.json") == ""


# ------------------------------------------------------------------ the fake model and its job


def task(item_id: str, **params: Any) -> TaskContext:
    ref = JobRef(namespace="default", name="demo-classify", uid="u-1", pipeline=demo.PIPELINE)
    return TaskContext(task=Task(job=ref, item={"id": item_id}, params=params), attempt=1, worker_id="w")


def test_classify_is_a_batch_handler_deterministic_and_fails_about_two_percent() -> None:
    ids = [demo.item_id(i) for i in range(5000)]
    unreadable = [i for i in ids if demo.unreadable(i)]
    assert 0.01 < len(unreadable) / len(ids) < 0.03
    readable = [i for i in ids if not demo.unreadable(i)][:3]
    assert batch_spec(demo.classify) == BatchSpec(max_size=demo.BATCH_SIZE, max_wait=0.02)
    batch = [task(i, latency_seconds=0) for i in (readable[0], unreadable[0], *readable[1:])]
    first = demo.classify(batch)
    assert first[0] == demo.classify(batch[:1])[0]  # the same label in any batch
    assert [o["label"] in demo.LABELS for o in (first[0], *first[2:])] == [True, True, True]
    assert isinstance(first[1], PermanentError) and "corrupt image header" in str(first[1])


def test_one_model_call_takes_about_as_long_as_its_slowest_image(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(demo.time, "sleep", slept.append)
    images = [demo.item_id(i) for i in range(8)]
    demo.MODEL.predict(images, 0.02)
    assert slept == [max(demo.latency(i, 0.02) for i in images)]


def test_latency_varies_per_item_within_half_to_one_and_a_half_of_the_mean() -> None:
    values = {demo.latency(demo.item_id(i), 0.02) for i in range(200)}
    assert len(values) > 50
    assert all(0.01 <= v <= 0.03 for v in values)


def test_a_crash_item_exits_the_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(demo.os, "_exit", fake_exit)
    with pytest.raises(Exited) as exited:
        demo.classify(
            [
                task(i, crash_items=["img-00030.jpg"], latency_seconds=0)
                for i in ("img-00029.jpg", "img-00030.jpg")
            ]
        )
    assert exited.value.args == (demo.CRASH_EXIT_CODE,)


def test_crash_items_sit_inside_the_job_and_are_distinct() -> None:
    assert demo.crash_items(300) == ["img-00030.jpg", "img-00090.jpg", "img-00150.jpg"]
    assert demo.crash_items(5000) == ["img-00500.jpg", "img-01500.jpg", "img-02500.jpg"]
    assert demo.crash_items(3) == ["img-00000.jpg", "img-00001.jpg"]
    assert demo.crash_items(0) == []


def test_manifest_is_a_valid_mljob_with_fast_exhaustion() -> None:
    manifest = demo.manifest(50, 0.01, ["img-00005.jpg"])
    spec = MLJobSpec.model_validate(manifest["spec"])
    assert (spec.max_deliver, spec.ack_wait_seconds) == (2, 5)
    assert spec.items is not None and len(spec.items) == 50
    assert spec.params == {"latency_seconds": 0.01, "crash_items": ["img-00005.jpg"]}


def test_manifest_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["manifest", "10", "0.5", "img-00001.jpg,img-00002.jpg"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["spec"]["params"]["crash_items"] == ["img-00001.jpg", "img-00002.jpg"]
    assert demo.main(["manifest", "10", "0.5", ""]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["params"]["crash_items"] == []
    assert demo.main(["crash-items", "300"]) == 0
    assert capsys.readouterr().out.strip() == "img-00030.jpg,img-00090.jpg,img-00150.jpg"


# ------------------------------------------------------------------ token kubeconfig


def test_token_kubeconfig_keeps_the_cluster_and_drops_the_certificate() -> None:
    admin = {
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority-data": "Q0E="},
            }
        ],
        "users": [
            {"name": "admin", "user": {"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5"}}
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        "current-context": "local",
    }
    config = demo_kube.token_kubeconfig(admin, "tok")
    assert config["users"] == [{"name": demo_kube.USER, "user": {"token": "tok"}}]
    assert config["contexts"][0]["context"] == {"cluster": "local", "user": demo_kube.USER}
    assert config["clusters"] == admin["clusters"]
    assert admin["users"][0]["name"] == "admin", "the admin's config is left alone"
    assert "client-key-data" not in json.dumps(config)


# ------------------------------------------------------------------ report


def test_failures_are_grouped_by_the_operators_reason_or_the_handlers_message() -> None:
    rows = [
        ("img-2.jpg", "img-2.jpg: corrupt image header"),
        ("img-9.jpg", "MaxDeliveriesExceeded: exhausted 2 deliveries"),
        ("img-1.jpg", "img-1.jpg: corrupt image header"),
        ("img-5.jpg", None),
    ]
    groups = demo_report.group_failures(rows)
    assert groups == {
        "corrupt image header": ["img-1.jpg", "img-2.jpg"],
        "(no message)": ["img-5.jpg"],
        "MaxDeliveriesExceeded": ["img-9.jpg"],
    }
    lines = demo_report.format_groups({"a": ["1", "2", "3"], "bb": ["4"]}, shown=2)
    assert lines == ["  a       3  1, 2, … (+1)", "  bb      1  4"]


def test_exhaustions_are_read_from_the_operators_log() -> None:
    log = (
        "2026-01-01 12:00:00,000 INFO mljob.controller.exhausted: job default/demo (u): "
        "item img-00500.jpg failed "
        "(MaxDeliveriesExceeded, 2 deliveries, 0.031s after exhaustion)\n"
        "... item img-7.jpg failed (MaxDeliveriesExceeded, 3 deliveries)\n"
        "... item img-8.jpg exhausted 2 deliveries but already had an outcome\n"
    )
    assert demo_report.parse_exhaustions(log) == {
        "img-00500.jpg": demo_report.Exhaustion(2, 0.031),
        "img-7.jpg": demo_report.Exhaustion(3, None),
    }


BEFORE = """\
# TYPE mljob_items_processed_total counter
mljob_items_processed_total 0.0
# TYPE mljob_jobs gauge
mljob_jobs{phase="Running"} 0.0
mljob_jobs{phase="Succeeded"} 0.0
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 10.0
"""
AFTER = """\
# TYPE mljob_items_processed_total counter
mljob_items_processed_total 300.0
# TYPE mljob_items_failed_total counter
mljob_items_failed_total{reason="MaxDeliveriesExceeded"} 3.0
mljob_items_failed_created{reason="MaxDeliveriesExceeded"} 1.7e9
# TYPE mljob_jobs gauge
mljob_jobs{phase="Running"} 0.0
mljob_jobs{phase="Succeeded"} 1.0
# TYPE mljob_reconcile_duration_seconds histogram
mljob_reconcile_duration_seconds_bucket{action="progress",le="0.1"} 4.0
mljob_reconcile_duration_seconds_bucket{action="progress",le="+Inf"} 5.0
mljob_reconcile_duration_seconds_count{action="progress"} 5.0
mljob_reconcile_duration_seconds_sum{action="progress"} 0.25
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 99.0
"""


def test_metrics_that_moved_leave_out_buckets_other_processes_and_unchanged_series() -> None:
    rows = demo_report.moved(demo_report.parse_metrics(BEFORE), demo_report.parse_metrics(AFTER))
    assert rows == [
        ('mljob_items_failed_total{reason="MaxDeliveriesExceeded"}', 0.0, 3.0),
        ("mljob_items_processed_total", 0.0, 300.0),
        ('mljob_jobs{phase="Succeeded"}', 0.0, 1.0),
        ('mljob_reconcile_duration_seconds_count{action="progress"}', 0.0, 5.0),
        ('mljob_reconcile_duration_seconds_sum{action="progress"}', 0.0, 0.25),
    ]
    lines = demo_report.format_moved(rows[1:2] + rows[4:])
    assert [line.split() for line in lines] == [
        ["mljob_items_processed_total", "0", "->", "300"],
        ['mljob_reconcile_duration_seconds_sum{action="progress"}', "0", "->", "0.250"],
    ]
    assert len({line.index("->") for line in lines}) == 1, "aligned"
    assert demo_report.moved({}, demo_report.parse_metrics("")) == []


def test_crashes_line_names_the_exit_statuses() -> None:
    state = {"exits": [{"code": 3}, {"code": 3}, {"code": -9}]}
    assert demo_report.crashes_line(state) == (
        "worker processes died 3 time(s) (exit status -9, 3); each was restarted"
    )
    assert demo_report.crashes_line({"exits": []}).startswith(
        "worker processes died 0 time(s) (exit status -)"
    )


# ------------------------------------------------------------------ supervisor


def test_supervisor_restarts_a_dead_worker_and_reaps_every_one_on_stop(tmp_path: Path) -> None:
    marker = tmp_path / "started-once"
    # Dies with status 3 the first time, then runs until terminated.
    script = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "if not p.exists():\n    p.touch(); sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    state = tmp_path / "workers.json"
    supervisor = Supervisor([sys.executable, "-c", script], 1, tmp_path, state, grace_seconds=5)
    runner = threading.Thread(target=supervisor.run)
    runner.start()
    try:
        wait_for(
            lambda: json.loads(state.read_text())["crashes"] == 1,  # an exception: no state yet
            60,
            interval=0.05,
            what="the supervisor to record the crash",
        )
    finally:
        supervisor.stopping = True
        runner.join(timeout=60)
    assert not runner.is_alive()
    saved = json.loads(state.read_text())
    assert (saved["crashes"], [e["code"] for e in saved["exits"]], saved["pids"]) == (1, [3], [])
    slot = supervisor.slots[0]
    assert slot.starts == 2 and slot.proc is not None and slot.proc.returncode is not None
    assert (tmp_path / "worker-1.log").exists()
