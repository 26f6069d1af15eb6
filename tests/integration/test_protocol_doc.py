"""docs/protocol.md states some things the code defines: they are checked against the code here,
so the doc cannot drift (the behaviours themselves are tested in tests/integration/test_protocol_*.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mljob import protocol
from mljob.ops import permissions as nats_permissions
from mljob.settings import rows

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else len(DOC)]


def test_the_worker_settings_table_is_the_models() -> None:
    """Regenerate with the worker rows of `python -m mljob.settings` when this fails."""
    block = re.search(
        r"<!-- worker-settings-table[^>]*-->\n(.*?)<!-- end of worker-settings-table -->", DOC, re.S
    )
    assert block is not None, "docs/protocol.md lost its worker-settings-table markers"
    documented = [
        tuple(cell.strip() for cell in line.strip().strip("|").split(" | "))
        for line in block.group(1).splitlines()[2:]
    ]
    expected = [(v, d, m) for v, d, roles, m in rows() if "worker" in roles.split(", ")]
    assert documented == expected


def test_the_permissions_table_is_what_the_worker_is_granted() -> None:
    table = section("NATS permissions")
    documented = re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)? \|", table, re.M)
    subjects = [s for pair in documented for s in pair if s]
    granted = [s.replace("pipeline-x", "<p>") for s in nats_permissions.worker("pipeline-x").publish_allow]
    assert subjects == granted
    assert nats_permissions.worker("pipeline-x").subscribe_allow == (nats_permissions.INBOX,)
    assert f"subscribe to `{nats_permissions.INBOX}`" in table


def test_the_quoted_refusal_is_the_codes() -> None:
    with pytest.raises(protocol.UnsupportedVersion) as refused:
        protocol.decode_task(b'{"version": "2"}')
    assert f"`{refused.value}`" in DOC


def test_the_quoted_malformed_task_error_is_the_codes() -> None:
    job = b'{"uid": "u", "namespace": "n", "name": "j", "pipeline": "p"}'
    body = b'{"version": 2, "job": ' + job + b', "item": {"id": 1.5}}'
    with pytest.raises(protocol.MalformedMessage) as malformed:
        protocol.decode_task(body)
    assert f"`malformed task: {malformed.value}`" in DOC  # the worker prefixes "malformed task: "


def test_the_version_is_the_codes() -> None:
    assert f"Protocol version: **{protocol.PROTOCOL_VERSION}**" in DOC
    assert f"{protocol.MAX_RESULT_BYTES:,} bytes" in DOC
