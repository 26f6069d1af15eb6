"""Parse and validate a job's items, whatever their source (inline, ConfigMaps, URL manifest).

Pure: the adapters fetch bytes, this module turns them into items or a clear error that names
the item or source at fault, so a bad list fails the job before anything is dispatched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mljob.api.models import MAX_ITEM_ID_LENGTH

Item = dict[str, Any]


class ItemSourceError(ValueError):
    """The item list is unusable; the message says which item or source and why."""


def normalise(raw: object, where: str) -> Item:
    """An item as the wire carries it: a dict with a string `id` plus its free fields."""
    if isinstance(raw, str):
        item: Item = {"id": raw}
    elif isinstance(raw, Mapping):
        item = dict(raw)
        if not isinstance(item.get("id"), str):
            raise ItemSourceError(f"{where}: an item object needs a string `id`")
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        item = {"id": str(raw)}
    else:
        raise ItemSourceError(f"{where}: an item must be an id string or an object with an `id`")
    item_id = item["id"].strip()
    if not item_id:
        raise ItemSourceError(f"{where}: empty item id")
    if len(item_id) > MAX_ITEM_ID_LENGTH:
        raise ItemSourceError(f"{where}: item id longer than {MAX_ITEM_ID_LENGTH} characters")
    item["id"] = item_id
    return item


def parse_lines(text: str, source: str) -> list[Item]:
    """One id per line, or JSON lines with an `id`; blank lines and `#` comments are skipped."""
    items: list[Item] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source} line {number}"
        if stripped.startswith("{"):
            try:
                raw: object = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ItemSourceError(f"{where}: invalid JSON ({err.msg})") from err
        else:
            raw = stripped
        items.append(normalise(raw, where))
    return items


def from_inline(raw_items: Sequence[object]) -> list[Item]:
    return [normalise(raw, f"spec.items[{index}]") for index, raw in enumerate(raw_items)]


def from_configmaps(configmaps: Sequence[tuple[str, Mapping[str, str]]]) -> list[Item]:
    """Items from ConfigMap data, in the order the ConfigMaps are listed, keys sorted."""
    items: list[Item] = []
    for name, data in configmaps:
        for key in sorted(data):
            items.extend(parse_lines(data[key], f"ConfigMap {name} key {key}"))
    return items


def from_manifest(body: bytes, url: str, sha256: str | None) -> list[Item]:
    if sha256 is not None:
        actual = hashlib.sha256(body).hexdigest()
        if actual != sha256:
            raise ItemSourceError(
                f"manifest {url}: checksum mismatch, expected sha256 {sha256}, got {actual}"
            )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ItemSourceError(f"manifest {url}: not UTF-8 text") from err
    return parse_lines(text, f"manifest {url}")


def check_unique(items: Iterable[Item]) -> list[Item]:
    """Refuse duplicate ids: one id is one task, one result row, one Redis member."""
    seen: dict[str, int] = {}
    result = []
    for index, item in enumerate(items):
        first = seen.setdefault(item["id"], index)
        if first != index:
            raise ItemSourceError(f"duplicate item id {item['id']!r} (items {first} and {index})")
        result.append(item)
    if not result:
        raise ItemSourceError("the job has no items")
    return result
