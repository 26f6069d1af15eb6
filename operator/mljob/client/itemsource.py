"""The free fields of a job's items (an item is an id and, optionally, fields such as a URL),
read back from where the original MLJob took them: for a retry, whose tasks must carry the
same fields as the first run's.

The read-only API's items endpoint gives ids and outcomes, not fields (the ledger keeps them in
`mljob_items`, the API does not serve them yet), so they come from the original's own source:
its inline `spec.items`, its ConfigMaps, or its manifest URL (streamed, checked against its
`sha256`, only the wanted items kept). A source that can no longer be read is an error that
says so; `ids_only` retries by id alone instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from mljob.client.errors import ClientError, Unavailable
from mljob.client.jobs import Jobs
from mljob.core.items import Item, ItemSourceError, normalise, parse_line, text_lines

IDS_ONLY_HINT = "pass --ids-only (ids_only=True) to retry by id alone"


def _wanted(items: Iterable[Item], wanted: Collection[str]) -> dict[str, Item]:
    return {item["id"]: item for item in items if item["id"] in wanted}


def _lines(text_blocks: Iterable[bytes], source: str, wanted: Collection[str]) -> dict[str, Item]:
    found: dict[str, Item] = {}
    for number, line in text_lines(text_blocks, source):
        item = parse_line(line, source, number)
        if item is not None and item["id"] in wanted:
            found[item["id"]] = item
    return found


def from_inline(raw: list[Any], wanted: Collection[str]) -> dict[str, Item]:
    return _wanted((normalise(item, f"spec.items[{i}]") for i, item in enumerate(raw)), wanted)


def from_configmaps(jobs: Jobs, namespace: str, names: list[str], wanted: Collection[str]) -> dict[str, Item]:
    found: dict[str, Item] = {}
    for name in names:
        data = jobs.configmap(namespace, name)
        if data is None:
            raise ClientError(
                f"the original's ConfigMap {namespace}/{name} is gone, so its items' fields cannot be "
                f"read: {IDS_ONLY_HINT}"
            )
        for key in sorted(data):
            found.update(_lines([data[key].encode()], f"ConfigMap {name} key {key}", wanted))
    return found


def from_url(url: str, sha256: str | None, wanted: Collection[str], timeout: float = 60.0) -> dict[str, Item]:
    """The wanted items of the manifest at `url`, read as it streams (only those are kept)."""
    import urllib3

    digest = hashlib.sha256()

    def blocks(reply: Any) -> Iterable[bytes]:
        for block in reply.stream(64 * 1024):
            digest.update(block)
            yield block

    pool = urllib3.PoolManager(num_pools=1)
    try:
        reply = pool.request("GET", url, preload_content=False, timeout=timeout, retries=2)
        if reply.status != 200:
            raise Unavailable(f"the original's manifest {url} answered {reply.status}: {IDS_ONLY_HINT}")
        found = _lines(blocks(reply), f"manifest {url}", wanted)
    except urllib3.exceptions.HTTPError as err:
        raise Unavailable(f"cannot read the original's manifest {url} ({err}): {IDS_ONLY_HINT}") from None
    finally:
        pool.clear()
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ClientError(
            f"the original's manifest {url} changed since (sha256 {digest.hexdigest()}, the job names "
            f"{sha256}): its items' fields are not the ones that ran; {IDS_ONLY_HINT}"
        )
    return found


def fields_of(jobs: Jobs, original: Mapping[str, Any], wanted: Collection[str]) -> dict[str, Item]:
    """id -> item (with its fields) for the wanted ids, from the original MLJob's item source.
    An id the source no longer has maps to nothing (the caller retries it by id)."""
    spec = original.get("spec") or {}
    namespace = str((original.get("metadata") or {}).get("namespace") or "")
    source = spec.get("itemsFrom") or {}
    try:
        if spec.get("items"):
            return from_inline(list(spec["items"]), wanted)
        if source.get("configMaps"):
            return from_configmaps(jobs, namespace, list(source["configMaps"]), wanted)
        if source.get("url"):
            return from_url(str(source["url"]), source.get("sha256"), wanted)
    except ItemSourceError as err:
        raise ClientError(f"the original's items cannot be read again ({err}): {IDS_ONLY_HINT}") from None
    return {}
