"""A URL manifest parsed as its body streams in: the same items and errors as parsing the whole text,
wherever the blocks split it; and the operator's fetch of it from a real HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mljob.adapters.tasks import DispatchTarget, load_items
from mljob.api.models import MLJobSpec
from mljob.core import items

URL = "http://h/m.jsonl"


def blocks_of(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def parse(body: bytes, size: int, sha256: str | None = None) -> list[items.Item]:
    return items.check_unique(items.from_manifest(blocks_of(body, size), URL, sha256))


#: Block sizes: a byte at a time (every line and every multi-byte character split), odd sizes, whole.
SIZES = [1, 2, 3, 7, 64, 1 << 16]

CASES = [
    ("ids", b"a\nb\nc\n", ["a", "b", "c"]),
    ("no final newline", b"a\nb", ["a", "b"]),
    ("json lines", b'{"id": "x1", "uri": "s3://b/1"}\n{"id": "x2", "n": 2}\n', ["x1", "x2"]),
    ("ids and json mixed", b'a\n{"id": "b"}\n', ["a", "b"]),
    ("comments and blank lines", b"# header\n\na\n  \n# a\n\tb  \n\n", ["a", "b"]),
    ("crlf", b'a\r\nb\r\n\r\n{"id": "c"}\r\n', ["a", "b", "c"]),
    ("lone cr ends a line", b"a\rb\n", ["a", "b"]),
    ("numbers are ids", b'{"id": "7"}\n8\n', ["7", "8"]),
    ("multi-byte utf-8", 'é-1\n☃-2\n{"id": "𝄞-3"}\n'.encode(), ["é-1", "☃-2", "𝄞-3"]),
    ("byte order mark stays in the id", "\ufeffa\nb\n".encode(), ["\ufeffa", "b"]),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("case", "body", "ids"), CASES, ids=[c[0] for c in CASES])
def test_items_whatever_the_blocks(case: str, body: bytes, ids: list[str], size: int) -> None:
    assert [i["id"] for i in parse(body, size, hashlib.sha256(body).hexdigest())] == ids


ERRORS = [
    ("invalid json", b'a\n\n{"id": \n', "manifest http://h/m.jsonl line 3: invalid JSON"),
    ("no id", b'a\n{"uri": "x"}\n', "line 2: an item object needs a string `id`"),
    ("bad utf-8", b"a\nb\n\xff\xfe\n", "manifest http://h/m.jsonl line 3: not UTF-8 text"),
    ("truncated utf-8", b"a\r\nb\xc3\n", "line 2: not UTF-8 text"),
    ("utf-8 after a lone cr", b"a\rb\n\xffc\n", "line 3: not UTF-8 text"),
    ("empty id", b'{"id": "  "}\n', "line 1: empty item id"),
    ("duplicate", b"a\nb\n# again\nb\n", r"duplicate item id 'b' \(items 1 and 2\)"),
    ("empty body", b"", "the job has no items"),
    ("only comments", b"# nothing\n\n", "the job has no items"),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("case", "body", "message"), ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_name_the_line(case: str, body: bytes, message: str, size: int) -> None:
    with pytest.raises(items.ItemSourceError, match=message):
        parse(body, size, hashlib.sha256(body).hexdigest())


GNARLY = (
    '# items\r\n\r\nid-1\n{"id": "id-2", "x": [1, 2]}\r\n\n  id-3  \rid-4\x0bid-5\né\u2028☃\n\n{"id": "last"}'
).encode()


@pytest.mark.parametrize("size", range(1, 12))
def test_same_items_and_line_numbers_as_the_whole_text(size: int) -> None:
    """Numbered exactly as `str.splitlines` numbers the decoded body, as before streaming."""
    whole = items.parse_lines(GNARLY.decode(), f"manifest {URL}")
    assert items.from_manifest(blocks_of(GNARLY, size), URL, None) == whole
    numbered = list(items.text_lines(blocks_of(GNARLY, size), "m"))
    assert numbered == list(enumerate(GNARLY.decode().splitlines(), start=1))


def test_a_line_across_many_blocks_and_empty_blocks() -> None:
    long_id = "x" * 5000
    blocks = [b"", b"a\n", *blocks_of(long_id.encode(), 3), b"", b"\nb", b"", b"\n"]
    assert list(items.byte_lines(blocks)) == [b"a", long_id.encode(), b"b"]
    assert list(items.byte_lines([b"\n", b"\n"])) == [b"", b""]


def test_checksum_of_the_whole_body() -> None:
    body = b"a\nb\n"
    good = hashlib.sha256(body).hexdigest()
    assert [i["id"] for i in parse(body, 1, good)] == ["a", "b"]
    with pytest.raises(
        items.ItemSourceError, match=f"checksum mismatch, expected sha256 {'0' * 64}, got {good}"
    ):
        parse(body, 1, "0" * 64)


@pytest.mark.parametrize("body", [b"{broken\nb\n", b"a\n\xff\nc\n", b"a\na\n"])
def test_checksum_mismatch_wins_over_a_bad_line(body: bytes) -> None:
    """A body that is not the one the job names is reported as such, not by its first bad line;
    the rest of the body after a bad line still counts towards the checksum."""
    with pytest.raises(items.ItemSourceError, match="checksum mismatch"):
        parse(body, 2, "0" * 64)
    with pytest.raises(items.ItemSourceError) as err:
        parse(body, 2, hashlib.sha256(body).hexdigest())
    assert "checksum" not in str(err.value)


def test_items_are_built_once_and_share_their_keys() -> None:
    body = b'{"id": "a", "uri": "u1"}\n{"id": "b", "uri": "u2"}\n'
    parsed = items.from_manifest([body], URL, None)
    assert items.check_unique(parsed) is parsed  # checked, not copied
    first, second = (list(item) for item in parsed)
    assert all(k1 is k2 for k1, k2 in zip(first, second, strict=True))


def test_item_ids_read_through() -> None:
    listed = [{"id": f"i{n}", "uri": "u"} for n in range(5)]
    ids = items.ItemIds(listed)
    assert (len(ids), ids[0], ids[-1], ids[1:3], list(ids)) == (
        5,
        "i0",
        "i4",
        ["i1", "i2"],
        [f"i{n}" for n in range(5)],
    )
    assert ids and not items.ItemIds([])


# ---------------------------------------------------------------------- the operator's fetch
Body = Callable[[], Iterator[bytes]]


@pytest.fixture
def serve() -> Iterator[Callable[[Body], str]]:
    """Serve a body (an iterator of pieces, written and flushed one by one) on a loopback port."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(body: Body) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/m.jsonl":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.end_headers()
                for piece in body():
                    self.wfile.write(piece)
                    self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/m.jsonl"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def target(url: str, sha256: str | None = None) -> DispatchTarget:
    source = {"url": url, **({"sha256": sha256} if sha256 else {})}
    spec = MLJobSpec.model_validate({"pipeline": "p", "itemsFrom": source})
    return DispatchTarget(uid="u", namespace="ns", name="job", spec=spec)


async def no_configmaps(namespace: str, name: str) -> None:
    raise AssertionError("a URL manifest reads no ConfigMap")


async def test_fetch_in_small_reads_with_checksum(
    serve: Callable[[Body], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "".join(f'{{"id": "item-{n:05d}", "note": "é{n}"}}\r\n' for n in range(20_000)).encode()
    monkeypatch.setattr("mljob.adapters.tasks.MANIFEST_READ_BLOCK", 1000)  # lines and characters split
    url = serve(lambda: iter(blocks_of(body, 4096)))
    loaded = await load_items(target(url, hashlib.sha256(body).hexdigest()), no_configmaps)
    assert len(loaded) == 20_000 and loaded[-1] == {"id": "item-19999", "note": "é19999"}
    with pytest.raises(items.ItemSourceError, match="checksum mismatch"):
        await load_items(target(url, "0" * 64), no_configmaps)


async def test_a_slow_manifest_never_blocks_the_event_loop(serve: Callable[[Body], str]) -> None:
    def slowly() -> Iterator[bytes]:
        for n in range(6):
            time.sleep(0.1)
            yield f"slow-{n}\n".encode()

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        loaded = await load_items(target(serve(slowly)), no_configmaps)
    finally:
        ticker.cancel()
    assert [i["id"] for i in loaded] == [f"slow-{n}" for n in range(6)]
    assert ticks >= 10, "the event loop waited for the download"


async def test_unreadable_manifests(serve: Callable[[Body], str]) -> None:
    url = serve(lambda: iter([b"a\n"]))
    with pytest.raises(
        items.ItemSourceError, match=re.escape(f"manifest {url}x: cannot be read (HTTP Error 404")
    ):
        await load_items(target(url + "x"), no_configmaps)
    with pytest.raises(items.ItemSourceError, match="line 2: not UTF-8 text"):
        await load_items(target(serve(lambda: iter([b"a\n", b"\xff\n"]))), no_configmaps)


async def test_configmap_items_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing, de-duplicating and sorting a ConfigMap source is CPU work of seconds for a
    million lines: it runs in a thread, like a URL manifest's, not on the event loop."""
    threads: dict[str, int] = {}

    def recorded(name: str, original: Callable[..., list[items.Item]]) -> Callable[..., list[items.Item]]:
        def wrapper(*args: object) -> list[items.Item]:
            threads[name] = threading.get_ident()
            return original(*args)

        return wrapper

    monkeypatch.setattr(items, "from_configmaps", recorded("parse", items.from_configmaps))
    monkeypatch.setattr(items, "check_unique", recorded("unique", items.check_unique))

    async def configmap_data(namespace: str, name: str) -> dict[str, str]:
        return {"ids": "\n".join(f"{name}-{n}" for n in range(3))}

    spec = MLJobSpec.model_validate({"pipeline": "p", "itemsFrom": {"configMaps": ["a", "b"]}})
    loaded = await load_items(DispatchTarget("u", "ns", "job", spec), configmap_data)
    assert [i["id"] for i in loaded] == [f"{name}-{n}" for name in "ab" for n in range(3)]
    assert set(threads) == {"parse", "unique"}
    assert threading.get_ident() not in threads.values(), "the ConfigMap source was parsed on the event loop"
