"""`make demo` keeps working: run its script on a small job (it starts and stops its own stack).

The script must install the chart, run the operator on the chart's ServiceAccount token, recover
the items that crash their worker (MaxDeliveriesExceeded), agree with Postgres, clean up, and
leave no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

from mljob_dev.demo import model as demo
from support.stack import ROOT

ITEMS = 300


def survivors(mark: str) -> list[str]:
    """Live processes whose environment carries `mark` (every process the demo started does)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"DEMO_TEST_MARK={mark}".encode() in environ:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {cmdline}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_demo_script_recovers_crashes_agrees_with_postgres_and_leaves_nothing_running() -> None:
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        "DEMO_ITEMS": str(ITEMS),
        "DEMO_LATENCY_SECONDS": "0.002",
        "DEMO_TEST_MARK": mark,
        "DEMO_WAIT": "0",  # no waiting for Enter at the end
    }
    for var in ("KUBECONFIG", "MLJOB_STACK_DIR", "DEMO_CRASH_ITEMS", "DEMO_WORKERS"):
        env.pop(var, None)
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert survivors(mark) == [], "the demo left processes running"
    assert "no process of this demo is left" in out, out[-2000:]

    crashing = demo.crash_items(ITEMS)
    unreadable = [demo.item_id(i) for i in range(ITEMS) if demo.unreadable(demo.item_id(i))]
    assert len(crashing) == 3 and unreadable and not set(crashing) & set(unreadable)
    failed = len(crashing) + len(unreadable)

    # The operator ran as the chart's ServiceAccount, on a kubeconfig holding only its token.
    assert re.search(r"Username\s+system:serviceaccount:mljob-system:mljob-operator", out), out
    logs = re.search(r"logs stay in (\S+)\)", out)
    assert logs, out
    config = json.loads((Path(logs.group(1)) / "operator.kubeconfig").read_text())
    assert [sorted(u["user"]) for u in config["users"]] == [["token"]], "not the token alone"
    assert "mljob operator ready" in (Path(logs.group(1)) / "operator.log").read_text()

    # The verdict, as the MLJob status says it.
    assert (
        f"VERDICT: demo-classify Succeeded (CompletedWithFailures): "
        f"{ITEMS - failed} of {ITEMS} items succeeded, {failed} failed"
    ) in out, out

    # Postgres agrees, and groups the failures by reason.
    assert (
        f"mljob_jobs: phase=Succeeded reason=CompletedWithFailures total={ITEMS} "
        f"processed={ITEMS} failed={failed}"
    ) in out, out
    assert f"mljob_results: failed {failed}, succeeded {ITEMS - failed}" in out, out
    assert re.search(rf"MaxDeliveriesExceeded\s+3\s+{', '.join(map(re.escape, crashing))}\n", out), out
    assert re.search(rf"corrupt image header\s+{len(unreadable)}\s", out), out

    # The crash items killed their worker on both deliveries; each was failed on exhaustion.
    assert "worker processes died 6 time(s) (exit status 3); each was restarted" in out, out
    for item in crashing:
        assert re.search(
            rf"{re.escape(item)}: MaxDeliveriesExceeded after 2 deliveries, "
            r"failed row [0-9.]+s after exhaustion",
            out,
        ), out

    # The metrics moved with the job (the operator serves /metrics on MLJOB_METRICS_PORT).
    assert re.search(rf"mljob_items_processed_total\s+0 -> {ITEMS}\n", out), out
    assert re.search(r'mljob_items_failed_total\{reason="MaxDeliveriesExceeded"\}\s+0 -> 3\n', out), out

    # Nothing of the job is left in NATS or Redis.
    assert re.search(r"consumer MLJOB_TASKS_demo-classify/workers-\S+: gone", out), out
    assert re.search(r"tasks on mljob\.tasks\.demo-classify\.\S+: 0\n", out), out
    assert re.search(r"registry mljob-registry/demo-classify\.\S+: gone", out), out
    assert re.search(r"Redis mljob:\{\S+\}:\*: 0 key\(s\)", out), out
    assert re.search(r"\b0 of \d+ observed resource\(s\) would be removed", out), out

    # The job page answered the viewer the demo set up, with Postgres' counts; then its address,
    # the login's token file and the commands to try (never the token itself).
    assert re.search(
        rf"the job page answers 200 as system:serviceaccount:default:demo-viewer: "
        rf"{ITEMS - failed:,} succeeded, {failed:,} failed, as in Postgres",
        out,
    ), out
    page = re.search(r"open +(http://127\.0\.0\.1:\d+/ui/namespaces/default/mljobs/demo-classify)\n", out)
    assert page, out
    token_file = Path(logs.group(1)) / "viewer.token"
    assert f"with the token in {token_file}" in out and token_file.read_text().strip() not in out
    for command in ("status demo-classify", "items demo-classify --failed", "results demo-classify -o csv"):
        assert f"kubectl mljob {command}" in out, out
