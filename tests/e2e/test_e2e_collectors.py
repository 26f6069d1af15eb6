"""The collector as separate replicas (`mljob collector`) sharing one durable consumer."""

from __future__ import annotations

from support.env import E2E


def test_two_external_collectors_share_the_results_exactly_once(e2e: E2E) -> None:
    assert e2e.operator is not None
    e2e.operator.stop()
    operator = e2e.start_operator("--no-collector")
    for _ in range(2):
        e2e.start_collector()
    items = [f"rc-{i:04d}" for i in range(1500)]
    uid = e2e.apply("replicated", "replicas", items)
    for _ in range(2):
        e2e.start_worker("replicas", "tenth_fail", "--concurrency", "16", "--batch", "32")
    status = e2e.wait_terminal("replicated", timeout=180)
    assert (status["phase"], status["processed"], status["failed"]) == ("Succeeded", 1500, 150)
    results = e2e.result_rows(uid)
    assert len(results) == 1500
    assert sum(1 for outcome in results.values() if outcome == "failed") == 150
    collectors = [p for p in e2e.procs if p.name == "collector"]
    assert all(p.alive() for p in collectors), "\n".join(p.log_tail() for p in collectors)
    assert "collector external" in operator.log_tail(200), "the operator must not collect in-process"
