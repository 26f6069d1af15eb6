"""`mljob.client` and the job commands (`mljob status|items|retry|results|watch|cancel`, the same
as `kubectl mljob ...`) against the real apiserver, stores, operator, workers and read-only API.

The caller is a ServiceAccount with a Role of what a person using the plugin needs (MLJobs: get,
list, watch, create, patch; ConfigMaps: get, create, patch, delete; services/proxy: get), on a
kubeconfig holding only its token: the Kubernetes calls and the API's reviews both see that
user. The API runs as test_e2e_api.py runs it (`support.api`). One job of 100,000 items (a tenth
of them fail, the handler does nothing else) serves the items, results and paging tests and the
memory bound; small jobs serve the rest.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mljob.client import Client
from mljob.client.manifests import ITEMS_OF, RETRY_ITEMS, RETRY_OF, RETRY_OF_UID, RETRY_REASON
from support.api import MLJOBS, ServedApi, api_service_account, rbac_manifest, read_only_api, token
from support.env import E2E
from support.harness import ROOT, child_env, mljob_cmd
from support.peak import run_measured
from support.stack import Kubectl

RELEASE = "cl"
BIG, SMALL, IDLE = "cl-big", "cl-small", "cl-idle"
BIG_ITEMS = 100_000
SMALL_ITEMS = [{"id": f"s-{n:03d}", "url": f"https://images.invalid/s-{n:03d}.jpg"} for n in range(40)]
FAILED_SMALL = sorted(item["id"] for item in SMALL_ITEMS if item["id"].endswith("7"))


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Setup:
    e2e: E2E
    api: ServedApi
    kubeconfig: str
    tokens: dict[str, str]
    tmp: Path
    #: the retry whose items went into ConfigMaps (test_retry...)
    retried: str | None = None

    @property
    def namespace(self) -> str:
        return self.e2e.namespace

    def env(self, **extra: str) -> dict[str, str]:
        """The CLI's environment: the caller's kubeconfig (its namespace is passed with -n), the API's
        URL, a cache of its own; none of the stack's MLJOB_* store settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLJOB_")}
        env.update(
            KUBECONFIG=self.kubeconfig,
            MLJOB_API_URL=self.api.base,
            XDG_CACHE_HOME=str(self.tmp / "cache"),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return child_env(env)

    def cli(self, *args: str, code: int | None = 0, **env: str) -> Ran:
        """`mljob ARGS -n NS` in this process (as `main` runs it: its exit status, stdout and
        stderr; a traceback would fail the test), with the CLI's environment: the same code as the
        command, without a second start of Python and the Kubernetes client per call."""
        from mljob.cli.main import main

        out, err = io.BytesIO(), io.StringIO()
        stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        wanted = self.env(**env)
        with pytest.MonkeyPatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("MLJOB_") or k == "KUBECONFIG"]:
                patch.delenv(key)
            for key, value in wanted.items():
                if key.startswith(("MLJOB_", "XDG_")) or key == "KUBECONFIG":
                    patch.setenv(key, value)
            patch.setattr(sys, "stdout", stdout)
            patch.setattr(sys, "stderr", err)
            try:
                returncode = main([*args, "-n", self.namespace])
            except SystemExit as exit:  # argparse's usage errors
                returncode = int(exit.code or 0)
        ran = Ran(returncode, out.getvalue().decode(), err.getvalue())
        if code is not None:
            assert ran.returncode == code, (
                f"mljob {' '.join(args)}: {ran.returncode}\n{ran.stdout}\n{ran.stderr}"
            )
        return ran

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`mljob ARGS -n NS` as a process of its own."""
        proc = subprocess.run(
            [*mljob_cmd(*args), "-n", self.namespace],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def client(self) -> Client:
        return Client(self.namespace, kubeconfig=self.kubeconfig, api_url=self.api.base)


def _caller_rbac(namespace: str) -> str:
    return rbac_manifest(
        [
            (
                namespace,
                "ml-engineer",
                [
                    (MLJOBS, ["mljobs"], ["get", "list", "watch", "create", "patch"]),
                    ([""], ["configmaps"], ["get", "create", "patch", "delete"]),
                    ([""], ["services/proxy"], ["get"]),
                ],
            ),
            (namespace, "nobody", []),
        ]
    )


@pytest.fixture(scope="module")
def setup(e2e: E2E, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with read_only_api(e2e, kubectl, RELEASE) as served:
        kubectl.run("apply", "-f", "-", stdin=_caller_rbac(e2e.namespace))
        tokens = {name: token(kubectl, e2e.namespace, name) for name in ("ml-engineer", "nobody")}
        ready = Setup(
            e2e,
            served,
            kubectl._token_kubeconfig(tokens["ml-engineer"]),
            tokens,
            tmp_path_factory.mktemp("client"),
        )
        # The big job first: it runs while the small jobs' tests do.
        for _ in range(2):
            e2e.start_worker(BIG, "tenth_fail", "--concurrency", "32", "--batch", "64")
        e2e.start_worker(SMALL, "tenth_fail")
        with ready.client() as client:
            ids = [f"x-{n:06d}" for n in range(BIG_ITEMS)]
            assert client.submit("big", BIG, ids, max_deliver=2) == "big"
        yield ready


def test_python_client_submits_waits_and_reads(setup: Setup) -> None:
    """Submit from a list of items with fields, wait with a progress bar, read the failed items and
    the results as iterators and DataFrames, export Parquet."""
    import pyarrow.parquet as pq

    bar = io.StringIO()
    with setup.client() as client:
        name = client.submit("small", SMALL, SMALL_ITEMS, params={"size": 64}, max_deliver=3)
        body = client.get(name)
        assert body["spec"]["items"] == SMALL_ITEMS and body["spec"]["params"] == {"size": 64}
        status = client.wait(name, timeout=120, progress=True, out=bar)
        assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 40, 4)
        assert "small" in bar.getvalue() and "40/40" in bar.getvalue(), bar.getvalue()  # tqdm's bar

        failed = list(client.failed(name))
        assert [item["id"] for item in failed] == FAILED_SMALL
        assert {item["reason"] for item in failed} == {"HandlerFailed"}
        assert all(item["error"] == f"item {item['id']} is unreadable" for item in failed)
        assert [item["id"] for item in client.items(name, page_size=7)] == [i["id"] for i in SMALL_ITEMS]

        frame = client.items_frame(name, outcome="failed")
        assert list(frame["id"]) == FAILED_SMALL and list(frame.columns)[:3] == ["id", "outcome", "reason"]
        exported = setup.cli("results", name, "-o", "csv").stdout.splitlines()  # as the API streams it
        assert (
            exported[0] == "id,outcome,reason,error,attempts,worker,finished,result" and len(exported) == 41
        )
        results = list(client.results(name))
        assert len(results) == 40 and results[1]["result"] == {"id": "s-001", "double": 2}
        table = client.results_frame(name)
        assert len(table) == 40 and set(table["outcome"]) == {"succeeded", "failed"}

        path = setup.tmp / "small.parquet"
        assert client.export(name, str(path), "parquet") == 40
        read = pq.read_table(path)
        assert read.num_rows == 40 and json.loads(read.column("result")[0].as_py()) == {
            "id": "s-000",
            "double": 0,
        }

        data = client.status(name)
        assert data["postgres"]["outcomes"] == {"succeeded": 36, "failed": 4, "pending": 0}
        assert data["etaSeconds"] is None and data["runbook"] == []


def test_status_shows_the_four_stores_side_by_side(setup: Setup) -> None:
    ran = setup.run("status", "small")  # as a process of its own, once
    assert ran.returncode == 0, ran.stderr
    shown = ran.stdout
    lines = shown.splitlines()
    assert (
        "Phase:       Succeeded" in lines
        and "Progress:    100%  40 of 40 processed (4 failed), 0 pending" in lines
    )
    header = next(line for line in lines if "MLJob" in line and "NATS consumer" in line)
    assert header.split() == ["MLJob", "Postgres", "Redis", "NATS", "consumer"]
    processed = next(line for line in lines if line.strip().startswith("processed"))
    assert processed.split()[1:3] == ["40", "40"]  # the MLJob and Postgres; Redis and NATS cleaned up
    assert "no state" in shown and "no consumer" in shown
    assert "Failed by reason (Postgres): HandlerFailed 4" in shown and "Disagreements: none" in shown

    data = json.loads(setup.cli("status", "small", "-o", "json").stdout)
    assert data["phase"] == "Succeeded" and data["nats"]["present"] is False
    assert set(data) >= {
        "status",
        "postgres",
        "redis",
        "nats",
        "disagreements",
        "rate",
        "etaSeconds",
        "runbook",
    }
    import yaml

    assert yaml.safe_load(setup.cli("status", "small", "-o", "yaml").stdout)["uid"] == data["uid"]
    # The big job is most likely running by now: its rate over the last minute comes from the
    # API's throughput (results per 5 s, counted by Postgres), its ETA from that rate.
    with setup.client() as client:
        big = client.status("big")
    if big["phase"] == "Running" and big["postgres"]["outcomes"]["succeeded"] > 0:
        assert big["rate"]["perSecond"] > 0 and not big["rate"]["sinceStart"], big["rate"]
        assert big["etaSeconds"] is not None
    # The plugin's entry point, flags before the command as kubectl users write them.
    plugin = subprocess.run(
        [sys.executable, "-m", "mljob.cli.plugin", "-n", setup.namespace, "status", "small", "-o", "json"],
        env=setup.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert plugin.returncode == 0 and json.loads(plugin.stdout)["uid"] == data["uid"], plugin.stderr


def test_retry_creates_a_linked_job_of_the_failed_items(setup: Setup) -> None:
    original = setup.e2e.get("small")
    dry = setup.cli("retry", "small", "--dry-run", "-o", "json").stdout
    planned = json.loads(dry)
    assert planned["kind"] == "MLJob" and planned["spec"]["items"] == [
        item for item in SMALL_ITEMS if item["id"] in FAILED_SMALL
    ]
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException):  # nothing was created
        setup.e2e.get(planned["metadata"]["name"])

    done = setup.cli("retry", "small")
    new = done.stdout.strip()
    assert new.startswith("small-retry-") and "a retry of small, its 4 failed items" in done.stderr
    body = setup.e2e.get(new)
    meta, spec = body["metadata"], body["spec"]
    assert meta["labels"][RETRY_OF] == "small" and meta["labels"][RETRY_OF_UID] == original["metadata"]["uid"]
    assert (
        meta["annotations"][RETRY_OF] == f"{setup.namespace}/small"
        and meta["annotations"][RETRY_ITEMS] == "4"
    )
    assert spec["items"] == [item for item in SMALL_ITEMS if item["id"] in FAILED_SMALL]  # with their fields
    assert {k: v for k, v in spec.items() if k != "items"} == {
        k: v for k, v in original["spec"].items() if k != "items"
    }
    linked = setup.e2e.kubectl.json("-n", setup.namespace, "get", "mljobs", "-l", f"{RETRY_OF}=small")
    assert [job["metadata"]["name"] for job in linked["items"]] == [new]

    # More items than --max-inline-items go into ConfigMaps the new MLJob owns; one reason only.
    via = setup.cli("retry", "small", "--reason", "HandlerFailed", "--max-inline-items", "2").stdout.strip()
    body = setup.e2e.get(via)
    assert "items" not in body["spec"] and body["metadata"]["annotations"][RETRY_REASON] == "HandlerFailed"
    names = body["spec"]["itemsFrom"]["configMaps"]
    for cm_name in names:
        cm = setup.e2e.kubectl.json("-n", setup.namespace, "get", "configmap", cm_name)
        assert cm["metadata"]["labels"][ITEMS_OF] == via
        assert [ref["uid"] for ref in cm["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]]
    setup.retried = via  # test_retried_job_ran_the_failed_items sees it run, once it had time to

    refused = setup.cli("retry", "small", "--reason", "Lost", code=1)
    assert (
        refused.stderr.strip()
        == f"error: MLJob {setup.namespace}/small has no failed items of reason Lost: nothing to retry"
    )


def test_cancel(setup: Setup) -> None:
    with setup.client() as client:
        client.submit("idle", IDLE, [f"i-{n}" for n in range(5)])
    setup.e2e.wait_phase("idle", {"Running"}, timeout=60)
    done = setup.cli("cancel", "idle", "--wait", "--timeout", "60")
    assert done.stdout.splitlines() == [
        "mljob.mljob.dev/idle cancel requested (was Running)",
        "mljob.mljob.dev/idle Cancelled",
    ]
    again = setup.cli("cancel", "idle")
    assert "has already finished (Cancelled): nothing to cancel" in again.stdout


def test_watch_draws_bars_as_lines_and_in_place(setup: Setup) -> None:
    """Two watches at once: one into a pipe (plain lines) of two jobs a worker finishes, one on a
    terminal (redrawn in place) of a job no worker serves (IDLE) until it is cancelled, which is
    not a success."""
    with setup.client() as client:
        client.submit("w-one", SMALL, [f"w-{n:03d}" for n in range(12)])
        client.submit("w-two", SMALL, [f"v-{n:03d}" for n in range(8)])
        client.submit("w-tty", IDLE, [f"t-{n:03d}" for n in range(30)])
        piped = subprocess.Popen(
            [*mljob_cmd("watch", "w-one", "w-two"), "-n", setup.namespace],
            env=setup.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        main, child = pty.openpty()
        proc = subprocess.Popen(
            [*mljob_cmd("watch", "w-tty", "w-one"), "-n", setup.namespace],
            env=setup.env(COLUMNS="120"),
            stdin=child,
            stdout=child,
            stderr=child,
            cwd=ROOT,
        )
        os.close(child)
        screen = b""
        cancelled = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not cancelled and screen.count(b"w-tty [") >= 2:  # redrawn once: cancel
                client.cancel("w-tty")
                cancelled = True
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(10)
        os.close(main)
        out, err = piped.communicate(timeout=120)
    assert piped.returncode == 0 and "Traceback" not in err and "\x1b[" not in out, out + err
    last = {line.split()[0]: line for line in out.splitlines()}
    assert "12/12" in last["w-one"] and "Succeeded" in last["w-one"], out
    assert "8/8" in last["w-two"] and "Succeeded" in last["w-two"]
    assert setup.cli("watch", "no-such-job", code=1).stderr.startswith("error: no MLJob 'no-such-job'")

    text = screen.decode(errors="replace")
    assert cancelled and proc.returncode == 1, text
    assert "\x1b[1A" in text and "\x1b[K" in text, text  # redrawn in place: cursor up, erase the line
    assert "Running" in text and "Cancelled" in text and text.rstrip().endswith("w-tty ended Cancelled")


def test_errors_are_one_line_with_their_exit_status(setup: Setup) -> None:
    ns = setup.namespace
    refused = setup.cli("status", "small", code=1, MLJOB_API_TOKEN=setup.tokens["nobody"])
    assert refused.stderr.startswith(f"error: your token may not get mljobs/small in namespace {ns} (")
    missing = setup.cli("status", "no-such-job", code=1)
    assert missing.stderr.strip() == f"error: no MLJob 'no-such-job' in namespace '{ns}'"
    bad = setup.cli("items", "small", "--reason", "Bogus", code=2)
    assert bad.stderr.startswith("error: reason: one of DeadlineExceeded, HandlerFailed")
    assert setup.cli("items", "small", "--succeeded", "--reason", "Lost", code=2).stderr.startswith(
        "error: --reason"
    )
    assert setup.cli("items", "small", "--chunk-size", "0", code=2).returncode == 2  # argparse's usage error

    nobody = setup.e2e.kubectl._token_kubeconfig(setup.tokens["nobody"])
    cancel = setup.cli("cancel", "small", code=1, KUBECONFIG=nobody)
    assert (
        cancel.stderr.startswith("error: your credentials (")
        and f"may not get mljobs/small in namespace {ns}" in cancel.stderr
    )
    # The admin's client certificate is no token the API could check.
    admin = setup.cli("status", "small", code=2, KUBECONFIG=setup.e2e.stack.kubeconfig)
    assert "no token to send to the read-only API" in admin.stderr

    # Without --api-url: the apiserver's service proxy, on the caller's credentials and with its
    # token in X-MLJob-Token. The chart's default Service is in `mljob`, where the caller may not
    # proxy (403); in its own namespace a Service that is not there is a 404, and this release's,
    # with no pod behind it, a 503.
    env = {"MLJOB_API_URL": ""}
    elsewhere = setup.cli("status", "small", code=1, **env)
    assert elsewhere.stderr.startswith("error: your credentials (") and (
        "may not use the service proxy to mljob/mljob-operator-api (get services/proxy)" in elsewhere.stderr
    )
    absent = setup.cli("status", "small", "--api-service", f"{ns}/no-such-api", code=1, **env)
    assert absent.stderr.startswith(f"error: no read-only API Service {ns}/no-such-api (")
    # No endpoints controller runs on the local stack: the empty Endpoints it would write for a
    # Service with no ready pod (a pod behind it would need an address off loopback, which
    # Endpoints refuse).
    endpoints = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": api_service_account(RELEASE)}}
    setup.e2e.kubectl.run("-n", ns, "apply", "-f", "-", stdin=json.dumps({**endpoints, "subsets": []}))
    service = f"{ns}/{api_service_account(RELEASE)}:http"
    empty = setup.cli("status", "small", "--api-service", service, code=1, **env)
    assert (
        f"the read-only API's Service {ns}/{api_service_account(RELEASE)} has nothing to answer"
        in empty.stderr
    )
    wrong = setup.cli("status", "small", "--api-url", "ftp://x", code=2)
    assert wrong.stderr.strip() == "error: --api-url: input should be an http:// or https:// URL"


#: How far a command's peak RSS may rise from the 40-item job's to the 100,000-item job's (MB).
BYTES_MARGIN_MB, ITEMS_MARGIN_MB, PARQUET_MARGIN_MB = 10, 10, 40
#: What the bound must catch: the items of the job held at once, as a careless client would.
FULL_COPY = """
import sys
from mljob.client import Client
namespace, kubeconfig, url = sys.argv[1:]
print(len(list(Client(namespace, kubeconfig=kubeconfig, api_url=url).items("big", page_size=1000))))
"""


def _measured(setup: Setup, out: Path, *args: str) -> float:
    run = run_measured([*mljob_cmd(*args), "-n", setup.namespace], setup.env(), stdout=out)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    return run.peak_mb


def test_a_100000_item_job_pages_and_streams_in_bounded_memory(setup: Setup) -> None:
    waited = time.monotonic()
    status = setup.e2e.wait_terminal("big", timeout=420)
    print(f"\nwaited {time.monotonic() - waited:.1f}s for the 100,000-item job")
    assert (status["phase"], status["processed"], status["failed"]) == (
        "Succeeded",
        BIG_ITEMS,
        BIG_ITEMS // 10,
    )
    tmp = setup.tmp

    # The same commands on the 40-item job: the memory a run needs whatever the job's size.
    base = _measured(setup, tmp / "s.jsonl", "results", "small")  # Python and the client's imports
    base_parquet = _measured(
        setup, tmp / "s.log", "results", "small", "-o", "parquet", "--output", str(tmp / "s.pq")
    )

    items_mb = _measured(setup, tmp / "items.csv", "items", "big", "-o", "csv", "--chunk-size", "1000")
    rows = (tmp / "items.csv").read_text().splitlines()
    ids = [row.split(",", 1)[0] for row in rows[1:]]
    assert rows[0] == "id,outcome,reason,error,attempts,worker,finished"
    assert len(ids) == len(set(ids)) == BIG_ITEMS and ids == sorted(ids)

    jsonl_mb = _measured(setup, tmp / "big.jsonl", "results", "big")
    size = (tmp / "big.jsonl").stat().st_size
    lines = (tmp / "big.jsonl").read_bytes().splitlines()
    assert len(lines) == BIG_ITEMS and json.loads(lines[7])["outcome"] == "failed"
    parquet_mb = _measured(
        setup, tmp / "p.log", "results", "big", "-o", "parquet", "--output", str(tmp / "big.parquet")
    )

    import pyarrow.parquet as pq

    table = pq.read_table(tmp / "big.parquet")
    assert table.num_rows == BIG_ITEMS and table.column("id")[99_999].as_py() == "x-099999"
    assert table.column("outcome").to_pylist().count("failed") == BIG_ITEMS // 10

    print(
        f"\npeak RSS MB: 40 items {base:.0f}; 100,000: items {items_mb:.0f}, results jsonl {jsonl_mb:.0f}; "
        f"parquet {base_parquet:.0f} -> {parquet_mb:.0f}; "
        f"export {size / 1e6:.1f} MB"
    )
    # The bounds, measured first (2 busy cores): `results` of the 40-item job peaks at 76 MB (Python
    # and the client's imports); on the 100,000-item job `items` at 78 and `results` at 76; Parquet
    # 180 -> 202 (pyarrow's own import is most of its base); the items held as a list (FULL_COPY)
    # at 102. So on 100,000 items a command must stay within a margin of the 40-item run: 10 MB for
    # the export (bytes passed through) and for items (a page of 1,000 at a time), 40 for Parquet
    # (a row group of 10,000 rows and pyarrow's pool). Holding the job would not fit them: the
    # export's bytes are asserted to be more than twice the 10 MB, and the full copy, measured the
    # same way, to be above the items margin.
    assert size > 2 * BYTES_MARGIN_MB * 1e6, f"the export ({size:,} bytes) must dwarf the margin"
    assert jsonl_mb < base + BYTES_MARGIN_MB, (base, jsonl_mb)
    assert items_mb < base + ITEMS_MARGIN_MB, (base, items_mb)
    assert parquet_mb < base_parquet + PARQUET_MARGIN_MB, (base_parquet, parquet_mb)
    copy = run_measured(
        [sys.executable, "-c", FULL_COPY, setup.namespace, setup.kubeconfig, setup.api.base], setup.env()
    )
    assert copy.returncode == 0 and copy.stdout.strip() == str(BIG_ITEMS), copy.stderr
    print(f"a full copy of the items in memory: {copy.peak_mb:.0f} MB")
    assert copy.peak_mb > base + ITEMS_MARGIN_MB, (base, copy.peak_mb)

    # Paging by hand: --limit prints where to go on; --after goes on from there, no gap, no repeat.
    first = setup.cli("items", "big", "--reason", "HandlerFailed", "--limit", "5", "-o", "jsonl")
    cursor = first.stderr.strip().rsplit(" ", 1)[1]
    assert first.stderr.startswith("5 items shown; more after --after ")
    second = setup.cli("items", "big", "--failed", "--after", cursor, "--limit", "5", "-o", "jsonl")
    got = [json.loads(line)["id"] for line in (first.stdout + second.stdout).splitlines()]
    assert got == [f"x-{n:06d}" for n in range(7, 100, 10)]
    failed = setup.cli("items", "big", "--failed", "-o", "jsonl").stdout.splitlines()
    assert len(failed) == BIG_ITEMS // 10
    # The retry of 10,000 failed items reads them from the API, 1,000 a page: inline (the most).
    planned = json.loads(setup.cli("retry", "big", "--dry-run", "-o", "json").stdout)
    assert len(planned["spec"]["items"]) == BIG_ITEMS // 10 and planned["spec"]["items"][0] == "x-000007"


def test_status_says_what_the_runbook_says_about_a_disagreement(setup: Setup) -> None:
    """With the operator stopped, a running job's Redis state is flushed: the stores disagree until
    the operator is back, and status names the runbook's entry."""
    with setup.client() as client:
        client.submit("split", IDLE, [f"d-{n}" for n in range(4)])
    setup.e2e.wait_phase("split", {"Running"}, timeout=60)
    assert setup.e2e.operator is not None
    setup.e2e.operator.stop()
    try:
        subprocess.run(
            mljob_cmd("chaos", "flush-state", f"{setup.namespace}/split"),
            env=setup.e2e.env,
            check=True,
            capture_output=True,
            timeout=60,
            cwd=ROOT,
        )
        shown = setup.cli("status", "split").stdout
        assert "- Redis has no state for this running job" in shown, shown
        assert "runbook: docs/operations.md, \"Row 12 — Redis lost the job's state" in shown
        assert "it says: the operator rebuilds the state from Postgres" in shown
        data = json.loads(setup.cli("status", "split", "-o", "json").stdout)
        assert [entry["section"].split(" — ")[0] for entry in data["runbook"]] == ["Row 12"]
        # Its rate is Postgres' count of the last minute's results (none: no worker serves it),
        # not an average since the start nor nothing for want of earlier samples.
        assert data["rate"]["perSecond"] == 0 and data["rate"]["sinceStart"] is False
        assert data["etaSeconds"] is None
    finally:
        setup.e2e.start_operator()


def test_retried_job_ran_the_failed_items(setup: Setup) -> None:
    """The retry whose items are in ConfigMaps (test_retry...) ran exactly the failed items, which
    fail again (the handler fails the ids ending in 7): the operator read the ConfigMaps."""
    assert setup.retried is not None
    assert setup.e2e.wait_terminal(setup.retried, timeout=180)["processed"] == len(FAILED_SMALL)
    lines = [
        json.loads(line) for line in setup.cli("items", setup.retried, "-o", "jsonl").stdout.splitlines()
    ]
    assert [(item["id"], item["outcome"]) for item in lines] == [(i, "failed") for i in FAILED_SMALL]


def test_the_example_runs_against_the_stack(setup: Setup) -> None:
    env = setup.env(MLJOB_API_TOKEN=setup.tokens["ml-engineer"], KUBECONFIG=setup.e2e.stack.kubeconfig)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "client_quickstart.py"),
            "--pipeline",
            SMALL,
            "--items",
            "50",
            "--namespace",
            setup.namespace,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "5 failed items" in out and "retried as" in out, out
