"""MLJob manifests the client creates: a submission from a list of items (or a URL), and the
retry of a job's failed items. Pure: no I/O, every rule a table test.

Up to `MAX_INLINE_ITEMS` items (and `MAX_INLINE_BYTES` of them) go inline in `spec.items`; more
go into ConfigMaps of JSON lines (`spec.itemsFrom.configMaps`), each under the 1 MiB an object may
hold, owned by the MLJob once it exists so that they go when it goes.

A retry is the original's spec with its items replaced (and `cancel` dropped), the original's
labels, a new name, and the link back to the original: labels `mljob.dev/retry-of` (its name, when
that fits a label value) and `mljob.dev/retry-of-uid`, annotations `mljob.dev/retry-of`
(NAMESPACE/NAME), `mljob.dev/retry-of-uid`, `mljob.dev/retry-items` and, when only one reason's
failures are retried, `mljob.dev/retry-reason`. Status, UID, resourceVersion and the original's
annotations are not carried over.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mljob.api.models import GROUP, KIND, MAX_INLINE_ITEMS, VERSION, MLJobSpec
from mljob.client.errors import UsageError
from mljob.core.items import Item, ItemSourceError, check_unique, normalise

RETRY_OF = f"{GROUP}/retry-of"
RETRY_OF_UID = f"{GROUP}/retry-of-uid"
RETRY_ITEMS = f"{GROUP}/retry-items"
RETRY_REASON = f"{GROUP}/retry-reason"
#: The label on a ConfigMap of items, naming its MLJob.
ITEMS_OF = f"{GROUP}/items-of"
#: The most bytes of items (as JSON) put inline; the MLJob object must stay well under etcd's limit.
MAX_INLINE_BYTES = 512 * 1024
#: The most bytes of JSON lines in one ConfigMap (an object holds at most 1 MiB, metadata included).
MAX_CONFIGMAP_BYTES = 900 * 1024
#: A generated name stays a DNS label (63 characters), as kubectl's generateName does.
MAX_NAME = 63
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's generateName alphabet
_RETRY_TAIL = re.compile(r"-retry-[a-z0-9]{5}$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass
class Manifests:
    """What to create, in order: the ConfigMaps (if any), then the MLJob."""

    job: dict[str, Any]
    configmaps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.job["metadata"]["name"])


def generated_name(base: str, suffix: str | None = None) -> str:
    """`<base>-retry-xxxxx`: a retry of a retry keeps the first base, not a growing chain."""
    base = _RETRY_TAIL.sub("", base)
    suffix = suffix or "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))
    tail = f"-retry-{suffix}"
    return base[: MAX_NAME - len(tail)].rstrip("-.") + tail


def spec_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """Spec fields from Python names or the manifest's (`failure_threshold` or `failureThreshold`)."""
    by_name = {name: info.alias or name for name, info in MLJobSpec.model_fields.items()}
    aliases = set(by_name.values())
    spec: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in by_name:
            spec[by_name[key]] = value
        elif key in aliases:
            spec[key] = value
        else:
            known = ", ".join(sorted(by_name))
            raise UsageError(f"{key}: not a field of an MLJob's spec (it has {known})")
    return spec


def normalised_items(raw: Iterable[object]) -> list[Item]:
    """Items as the operator reads them (an id, or an object with an id), checked: UsageError
    naming the first item at fault."""
    try:
        return check_unique([normalise(item, f"items[{index}]") for index, item in enumerate(raw)])
    except ItemSourceError as err:
        raise UsageError(str(err)) from None


def _line(item: Item) -> str:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))


def configmap_chunks(items: Sequence[Item], max_bytes: int = MAX_CONFIGMAP_BYTES) -> list[str]:
    """The items as JSON lines, cut into texts of at most `max_bytes` each."""
    chunks: list[str] = []
    lines: list[str] = []
    size = 0
    for item in items:
        line = _line(item) + "\n"
        length = len(line.encode())
        if length > max_bytes:
            raise UsageError(f"item {item['id']!r} alone is {length:,} bytes, more than a ConfigMap holds")
        if lines and size + length > max_bytes:
            chunks.append("".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += length
    if lines:
        chunks.append("".join(lines))
    return chunks


def _inline(items: Sequence[Item], max_items: int) -> bool:
    if len(items) > min(max_items, MAX_INLINE_ITEMS):
        return False
    return sum(len(_line(item)) + 1 for item in items) <= MAX_INLINE_BYTES


def _wire(item: Item) -> str | Item:
    """An item without fields inline as its id (as people write them), else the object."""
    return item["id"] if len(item) == 1 else item


def with_items(
    metadata: dict[str, Any],
    spec: dict[str, Any],
    items: Sequence[Item],
    max_inline: int = MAX_INLINE_ITEMS,
) -> Manifests:
    """The MLJob of `metadata` and `spec` (no items in it yet) carrying `items`: inline, or in
    ConfigMaps named after the job."""
    name = str(metadata["name"])
    spec = {k: v for k, v in spec.items() if k not in ("items", "itemsFrom")}
    job = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
    if not items:
        raise UsageError("no items: an MLJob needs at least one")
    if _inline(items, max_inline):
        spec["items"] = [_wire(item) for item in items]
        return Manifests(job)
    configmaps: list[dict[str, Any]] = []
    for index, text in enumerate(configmap_chunks(items)):
        cm_name = f"{name}-items-{index}"
        configmaps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": cm_name, "labels": {ITEMS_OF: name}},
                "data": {"items.jsonl": text},
            }
        )
    spec["itemsFrom"] = {"configMaps": [cm["metadata"]["name"] for cm in configmaps]}
    return Manifests(job, configmaps)


def submission(
    name: str,
    pipeline: str,
    items: Iterable[object] | None = None,
    url: str | None = None,
    sha256: str | None = None,
    labels: Mapping[str, str] | None = None,
    max_inline: int = MAX_INLINE_ITEMS,
    **options: Any,
) -> Manifests:
    """A new MLJob of `items` (ids or objects with an id), or of the manifest at `url`."""
    if (items is None) == (url is None):
        raise UsageError("give the items, or the URL of a manifest of them, not both and not neither")
    spec = {"pipeline": pipeline, **spec_fields(options)}
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = dict(labels)
    if url is not None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"url: an http(s) URL expected, got {url!r}")
        spec["itemsFrom"] = {"url": url, **({"sha256": sha256} if sha256 else {})}
        return Manifests(
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
        )
    assert items is not None
    return with_items(metadata, spec, normalised_items(items), max_inline)


def retry(
    original: Mapping[str, Any],
    items: Sequence[Item],
    reason: str | None = None,
    name: str | None = None,
    max_inline: int = MAX_INLINE_ITEMS,
) -> Manifests:
    """The retry of `original` (an MLJob as the apiserver returns it) for `items`, its failed ones."""
    meta = original.get("metadata") or {}
    namespace, old_name, uid = str(meta.get("namespace") or ""), str(meta["name"]), str(meta["uid"])
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in (RETRY_OF, RETRY_OF_UID)}
    labels[RETRY_OF_UID] = uid
    if len(old_name) <= 63 and _LABEL_VALUE.match(old_name):
        labels[RETRY_OF] = old_name
    annotations = {
        RETRY_OF: f"{namespace}/{old_name}",
        RETRY_OF_UID: uid,
        RETRY_ITEMS: str(len(items)),
    }
    if reason is not None:
        annotations[RETRY_REASON] = reason
    metadata = {"name": name or generated_name(old_name), "labels": labels, "annotations": annotations}
    spec = {k: v for k, v in dict(original.get("spec") or {}).items() if k != "cancel"}
    return with_items(metadata, spec, list(items), max_inline)
