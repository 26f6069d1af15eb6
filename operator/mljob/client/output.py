"""Writing what the API answers, as it arrives: items page by page (a table, CSV, JSON, JSON
lines or YAML) and results piece by piece (JSON lines or CSV as the API sends them, or Parquet,
with pyarrow, in row groups of `PARQUET_BATCH`). Nothing is held beyond a page or a row group.

A results file is written as `FILE.part` and renamed when the export ends whole: a transfer cut
short leaves no file that looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

from mljob.client.errors import UsageError, require
from mljob.client.reads import ITEM_COLUMNS, RESULT_COLUMNS, Page
from mljob.client.tables import PagedTable

ITEM_FORMATS = ("table", "wide", "csv", "json", "jsonl", "yaml")
RESULT_FORMATS = ("jsonl", "csv", "parquet")
#: The table's columns (the error last: it is the long one), and its width unless `-o wide`.
TABLE_COLUMNS = ("id", "outcome", "reason", "attempts", "worker", "finished", "error")
ERROR_WIDTH = 60
PARQUET_BATCH = 10_000


def write_items(pages: Iterator[Page], fmt: str, out: TextIO) -> tuple[int, str | None]:
    """Write the items of `pages` to `out` in `fmt` as each page arrives; returns how many were
    written and the last page's `next` (None: that was the job's last item)."""
    if fmt not in ITEM_FORMATS:
        raise UsageError(f"-o: one of {', '.join(ITEM_FORMATS)} expected for items, got {fmt!r}")
    written = 0
    resume: str | None = None
    paged = PagedTable(TABLE_COLUMNS, {} if fmt == "wide" else {"error": ERROR_WIDTH})
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(ITEM_COLUMNS)
    uid: str | None = None
    for current in pages:
        rows, resume = current.items, current.next
        if uid is None:
            uid = current.uid
            if fmt == "json":
                out.write(f'{{"uid": {json.dumps(uid)}, "items": [')
            elif fmt == "yaml":
                out.write(f"uid: {json.dumps(uid)}\nitems:{'' if rows else ' []'}\n")
        if fmt in ("table", "wide"):
            lines = paged.page(rows) if rows or written else []
            if lines:
                out.write("\n".join(lines) + "\n")
        elif writer is not None:
            writer.writerows([item.get(column) for column in ITEM_COLUMNS] for item in rows)
        elif fmt == "jsonl":
            out.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in rows)
        elif fmt == "json":
            out.writelines(
                ("\n  " if written + index == 0 else ",\n  ") + json.dumps(item, ensure_ascii=False)
                for index, item in enumerate(rows)
            )
        elif rows:  # yaml
            yaml: Any = require("yaml", "-o yaml", extra="client")
            out.write(yaml.safe_dump(rows, sort_keys=False, allow_unicode=True))
        written += len(rows)
        out.flush()
    if fmt == "json":
        out.write("\n]}\n" if written else "]}\n")
    elif fmt in ("table", "wide") and written == 0:
        sys.stderr.write("No items found.\n")
    out.flush()
    return written, resume


@contextlib.contextmanager
def _target(path: str | None) -> Iterator[BinaryIO]:
    """A binary sink: `path` written as `path.part` and renamed on success, else stdout."""
    if path is None or path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    final = Path(path)
    part = final.with_name(final.name + ".part")
    try:
        with open(part, "wb") as sink:
            yield sink
        os.replace(part, final)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def write_results(pieces: Iterator[bytes], fmt: str, path: str | None) -> int:
    """The API's export (JSON lines or CSV, in `pieces`) written to `path` (stdout: None) as
    `fmt`; returns the bytes written (jsonl, csv) or rows written (parquet)."""
    if fmt not in RESULT_FORMATS:
        raise UsageError(f"-o: one of {', '.join(RESULT_FORMATS)} expected for results, got {fmt!r}")
    if fmt == "parquet":
        require("pyarrow", "-o parquet")
        if path is None and sys.stdout.isatty():
            raise UsageError("-o parquet writes binary: pass --output FILE (or redirect stdout)")
        with _target(path) as sink:
            return parquet(_lines(pieces), sink)
    size = 0
    with _target(path) as sink:
        for piece in pieces:
            sink.write(piece)
            size += len(piece)
    return size


def _lines(pieces: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    from mljob.core.items import byte_lines

    for line in byte_lines(pieces):
        if line.strip():
            yield json.loads(line)


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("outcome", pa.string()),
            ("reason", pa.string()),
            ("error", pa.string()),
            ("attempts", pa.int64()),
            ("worker", pa.string()),
            ("finished", pa.timestamp("us", tz="UTC")),
            # the handler's result as the JSON it returned: results of one job need not share a shape
            ("result", pa.string()),
        ]
    )


def parquet(rows: Iterator[dict[str, Any]], sink: IO[bytes]) -> int:
    """Results rows into a Parquet file on `sink`, a row group per `PARQUET_BATCH` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    written = 0
    with pq.ParquetWriter(sink, schema) as writer:
        batch: dict[str, list[Any]] = {name: [] for name in RESULT_COLUMNS}

        def flush() -> None:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
            for column in batch.values():
                column.clear()

        for row in rows:
            for name in RESULT_COLUMNS[:-2]:
                batch[name].append(row.get(name))
            batch["finished"].append(_when(row.get("finished")))
            result = row.get("result")
            batch["result"].append(None if result is None else json.dumps(result, ensure_ascii=False))
            written += 1
            if len(batch["id"]) >= PARQUET_BATCH:
                flush()
        if batch["id"] or written == 0:
            flush()
    return written
