"""Item sources end to end: inline at kubectl scale, ConfigMaps at 50,000, URL manifests."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator

import pytest
import yaml

from support.env import E2E, configmap_manifests
from support.waiting import wait_for


def test_two_thousand_inline_items_applied_with_kubectl(e2e: E2E) -> None:
    items = [
        {"id": f"inline-{i:04d}", "url": f"s3://bucket/some/long/prefix/inline-{i:04d}.jpg"}
        for i in range(2000)
    ]
    manifest = {
        "apiVersion": "mljob.dev/v1alpha1",
        "kind": "MLJob",
        "metadata": {"name": "inline"},
        "spec": {"pipeline": "inline", "items": items},
    }
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    e2e.start_worker("inline", "quick", "--concurrency", "16", "--batch", "32")
    status = e2e.wait_terminal("inline", timeout=120)
    assert (status["phase"], status["processed"]) == ("Succeeded", 2000)
    meta = e2e.get("inline")["metadata"]
    # kopf only watches: no diff-base copy of the spec (2,000 items) and no progress annotations
    # on the object, and the one finalizer is the operator's own.
    kopf_marks = {k for k in meta.get("annotations", {}) if "kopf" in k or k.startswith("mljob.dev/")}
    assert kopf_marks == set(), kopf_marks
    assert meta["finalizers"] == ["mljob.dev/cleanup"]


def test_fifty_thousand_items_from_configmaps(e2e: E2E) -> None:
    ids = [f"cm-{i:05d}" for i in range(50_000)]
    names, manifests = configmap_manifests("many", ids)
    assert len(names) == 5
    e2e.kubectl.run("-n", e2e.namespace, "apply", "-f", "-", stdin=manifests)
    uid = e2e.apply("many", "many", itemsFrom={"configMaps": names})
    for _ in range(3):
        e2e.start_worker("many", "quick", "--concurrency", "32", "--batch", "64")
    status = e2e.wait_terminal("many", timeout=420)
    assert (status["phase"], status["total"], status["processed"], status["failed"]) == (
        "Succeeded",
        50_000,
        50_000,
        0,
    )
    assert len(e2e.result_rows(uid)) == 50_000


def test_missing_configmap_waits_with_a_condition_then_proceeds(e2e: E2E) -> None:
    e2e.apply("later", "later", itemsFrom={"configMaps": ["created-later"]})

    def waiting() -> bool:
        conditions = e2e.status("later").get("conditions", [])
        return any(
            c["type"] == "ItemsSourceReady" and c["reason"] == "ItemsSourceMissing" for c in conditions
        )

    wait_for(waiting, 30, what="the ItemsSourceMissing condition")
    assert e2e.status("later").get("phase") in (None, "Pending")
    _, manifests = configmap_manifests("created-later", ["x1", "x2", "x3"], per_map=10)
    e2e.kubectl.run(
        "-n", e2e.namespace, "apply", "-f", "-", stdin=manifests.replace("created-later-0", "created-later")
    )
    e2e.start_worker("later", "quick")
    assert e2e.wait_terminal("later", timeout=60)["phase"] == "Succeeded"


#: Items of the served manifest: JSON lines and plain ids, CRLF line ends, a comment, non-ASCII
#: ids; about 150 KiB, so the operator reads it in several blocks, lines split between them.
URL_ITEMS = 3000


@pytest.fixture
def manifest_server() -> Iterator[tuple[str, bytes]]:
    lines = ["# generated manifest"]
    for i in range(URL_ITEMS):
        item = {"id": f"url-{i:04d}-é", "page": i, "note": "☃" * 10}
        lines.append(json.dumps(item, ensure_ascii=False) if i % 2 else f"url-{i:04d}-é")
    body = "\r\n".join(lines).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for start in range(0, len(body), 999):  # sent in pieces, split mid-character too
                self.wfile.write(body[start : start + 999])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/manifest.jsonl", body
    server.shutdown()


def test_url_manifest_with_checksum(e2e: E2E, manifest_server: tuple[str, bytes]) -> None:
    url, body = manifest_server
    uid = e2e.apply("from-url", "urls", itemsFrom={"url": url, "sha256": hashlib.sha256(body).hexdigest()})
    e2e.start_worker("urls", "quick", "--concurrency", "16", "--batch", "64")
    status = e2e.wait_terminal("from-url", timeout=120)
    assert (status["phase"], status["total"], status["processed"], status["failed"]) == (
        "Succeeded",
        URL_ITEMS,
        URL_ITEMS,
        0,
    )
    rows = e2e.result_rows(uid)
    assert len(rows) == URL_ITEMS and rows[f"url-{URL_ITEMS - 1:04d}-é"] == "succeeded"


def test_url_manifest_with_a_wrong_checksum_is_refused(e2e: E2E, manifest_server: tuple[str, bytes]) -> None:
    url, _ = manifest_server
    uid = e2e.apply("bad-sum", "urls", itemsFrom={"url": url, "sha256": "0" * 64})
    status = e2e.wait_terminal("bad-sum", timeout=30)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidItems" and "checksum mismatch" in failed["message"]
    assert e2e.nats_leftovers(uid, "urls")["consumer"] is False, "nothing may be dispatched"
    wait_for(lambda: e2e.job_row(uid) is not None, 10, what="the job row")
