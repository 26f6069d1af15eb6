"""Parse and validate a job's items, whatever their source (inline, ConfigMaps, URL manifest).

Pure: the adapters fetch bytes, this module turns them into items or a clear error that names
the item or source at fault, so a bad list fails the job before anything is dispatched. A URL
manifest is parsed as its body streams in (`from_manifest` over blocks of bytes): the operator
holds the items once, never the body, its text or its lines besides.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Any, overload

from mljob.api.models import MAX_ITEM_ID_LENGTH

Item = dict[str, Any]


class ItemSourceError(ValueError):
    """The item list is unusable; the message says which item or source and why."""


def normalise(raw: object, where: str) -> Item:
    """An item as the wire carries it: a dict with a string `id` plus its free fields."""
    if isinstance(raw, str):
        item: Item = {"id": raw}
    elif isinstance(raw, Mapping):
        # Keys interned: a million items share one "id" and one of each other key, not a copy each.
        item = {sys.intern(k) if isinstance(k, str) else k: v for k, v in raw.items()}
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


def parse_line(line: str, source: str, number: int) -> Item | None:
    """The item of line `number` of `source`: an id, or a JSON object with an `id`; None for a
    blank line or a `#` comment."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("{"):
        try:
            raw: object = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ItemSourceError(f"{source} line {number}: invalid JSON ({err.msg})") from err
    else:
        raw = stripped
    return normalise(raw, f"{source} line {number}")


def parse_lines(text: str, source: str) -> list[Item]:
    """One id per line, or JSON lines with an `id`; blank lines and `#` comments are skipped."""
    items: list[Item] = []
    for number, line in enumerate(text.splitlines(), start=1):
        item = parse_line(line, source, number)
        if item is not None:
            items.append(item)
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


def byte_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a body read in blocks of any size, each without its `\\n`: a line may span
    blocks, and only the line being assembled is held."""
    partial: list[bytes] = []
    for block in blocks:
        lines = block.split(b"\n")
        if len(lines) == 1:
            partial.append(block)
            continue
        if partial:
            partial.append(lines[0])
            lines[0] = b"".join(partial)
        last = lines.pop()
        partial = [last] if last else []
        yield from lines
    tail = b"".join(partial)
    if tail:
        yield tail


def text_lines(blocks: Iterable[bytes], source: str) -> Iterator[tuple[int, str]]:
    """Numbered text lines of a UTF-8 body read in blocks, numbered as `str.splitlines` numbers
    the whole text (a lone `\\r` ends a line too); each line is decoded on its own, and one that is
    not UTF-8 is named."""
    number = 0
    for raw in byte_lines(blocks):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ItemSourceError(
                f"{source} line {number + 1}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from err
        for line in text.splitlines() or [""]:
            number += 1
            yield number, line


def _hashed(blocks: Iterable[bytes], update: Callable[[bytes], None]) -> Iterator[bytes]:
    for block in blocks:
        update(block)
        yield block


def from_manifest(blocks: Iterable[bytes], url: str, sha256: str | None) -> list[Item]:
    """The items of a URL manifest whose body arrives as `blocks` (pieces of any size), in one
    pass: hashed as the blocks come, parsed line by line into one list; the body is never held
    whole. A checksum mismatch is reported rather than an error in a line (the body is read to
    its end for it): such a body is not the manifest the job names."""
    source = f"manifest {url}"
    digest = hashlib.sha256()
    body = _hashed(blocks, digest.update)
    items: list[Item] = []
    try:
        for number, line in text_lines(body, source):
            item = parse_line(line, source, number)
            if item is not None:
                items.append(item)
    except ItemSourceError:
        if sha256 is not None:
            for _ in body:  # the rest of the body, for its checksum
                pass
            _check_sha256(digest.hexdigest(), sha256, url)
        raise
    if sha256 is not None:
        _check_sha256(digest.hexdigest(), sha256, url)
    return items


def _check_sha256(actual: str, expected: str, url: str) -> None:
    if actual != expected:
        raise ItemSourceError(f"manifest {url}: checksum mismatch, expected sha256 {expected}, got {actual}")


def fields_of(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """An item's free fields without its id (None: the item is only its id): what the ledger
    keeps beside the id, so a task can be rebuilt whatever happens to the source."""
    if len(item) == 1:
        return None
    return {key: value for key, value in item.items() if key != "id"}


def with_fields(item_id: str, fields: Mapping[str, Any] | None) -> Item:
    """The item a task carries, rebuilt from what the ledger kept (`fields_of`)."""
    return {"id": item_id, **(fields or {})}


def check_unique(items: list[Item]) -> list[Item]:
    """Refuse duplicate ids (one id is one task, one result row, one Redis member) and an empty
    list; returns `items` itself. Checked on the ids sorted: a list of references, 8 bytes an item
    at its peak where a set of them takes about 50, and no copy of the items."""
    if not items:
        raise ItemSourceError("the job has no items")
    ordered = sorted(ItemIds(items))
    if any(a == b for a, b in pairwise(ordered)):
        del ordered
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            first = seen.setdefault(item["id"], index)
            if first != index:
                raise ItemSourceError(f"duplicate item id {item['id']!r} (items {first} and {index})")
    return items


class ItemIds(Sequence[str]):
    """The ids of a list of items, read through: a sequence of a million ids without a second
    list of a million references."""

    def __init__(self, items: Sequence[Item]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [item["id"] for item in self._items[index]]
        return str(self._items[index]["id"])

    def __iter__(self) -> Iterator[str]:
        return (item["id"] for item in self._items)
