"""``GET /adapters`` at scale: 1,000 stored adapters listed page by page (``limit``, ``cursor``), by id prefix,
over HTTP and through the Python clients and the CLI (they walk the pages), against a live server.

The adapters are stored through the store API directly (tiny rank-1 adapters) before the server
starts on the same data dir, so the test spends its time listing, not uploading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from adapters.archive import AdapterFiles
from adapters.listing import encode_cursor, page
from adapters.store import AdapterStore
from clients import AsyncLoraplexClient, LoraplexClient
from server.cli import app
from tests.adapter_files import linear_shapes, make_adapter
from tests.live_server import LiveServer, start_live_server

N = 1000


def adapter_ids() -> list[str]:
    return [f"team-{i % 7}-adapter-{i:04d}" for i in range(N)]


@pytest.fixture(scope="module")
def live(tiny_base, tokenizer, tmp_path_factory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("listing")
    config, weights = make_adapter(tiny_base, r=1, targets=("q_proj",))
    # durability is not what this test checks: skip the fsyncs of 1,000 writes (about 30 s on a busy disk)
    with pytest.MonkeyPatch.context() as patch, AdapterStore(tmp / "data") as store:
        patch.setattr(os, "fsync", lambda fd: None)
        store.bind_base(linear_shapes(tiny_base), max_rank=8)
        for adapter_id in adapter_ids():
            store.put(adapter_id, AdapterFiles(config=config, weights=weights))
    server = start_live_server(tiny_base, tokenizer, tmp)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


class CountingTransport(httpx.HTTPTransport):
    """Records the query of every request a client sends."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[dict[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(dict(request.url.params))
        return super().handle_request(request)


class AsyncCountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.queries: list[dict[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(dict(request.url.params))
        return await super().handle_async_request(request)


def walk(client, **query) -> tuple[list[str], int]:
    """Every id, following X-Next-Cursor; and the number of pages."""
    ids: list[str] = []
    pages = 0
    params = dict(query)
    while True:
        r = client.get("/adapters", params=params)
        assert r.status_code == 200, r.text
        pages += 1
        body = r.json()
        assert isinstance(body, list) and len(body) <= params.get("limit", 100)
        ids += [summary["id"] for summary in body]
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in r.headers
            return ids, pages
        link = re.fullmatch(r'</adapters\?(.+)>; rel="next"', r.headers["link"])
        assert link is not None and f"cursor={cursor}" in link.group(1)
        params = {**query, "cursor": cursor}


def test_a_thousand_adapters_page_by_page(server) -> None:
    everything = sorted(adapter_ids())
    ids, pages = walk(server, limit=64)
    assert ids == everything and pages == -(-N // 64)
    ids, pages = walk(server, limit=1000)
    assert ids == everything and pages == 1
    assert [s["id"] for s in server.get("/adapters").json()] == everything  # unpaged: today's answer


def test_prefix_filters_and_pages(server) -> None:
    team3 = sorted(i for i in adapter_ids() if i.startswith("team-3-"))
    ids, pages = walk(server, prefix="team-3-", limit=50)
    assert ids == team3 and pages == -(-len(team3) // 50)
    assert [s["id"] for s in server.get("/adapters", params={"prefix": "team-3-"}).json()] == team3
    assert walk(server, prefix="nobody", limit=10) == ([], 1)
    ids, _ = walk(server, prefix="team-3-adapter-000", limit=2)
    assert ids == ["team-3-adapter-0003"]


def test_cursor_alone_pages_by_default_and_bad_queries_are_refused(server) -> None:
    first = sorted(adapter_ids())[0]
    r = server.get("/adapters", params={"cursor": encode_cursor(first)})
    assert r.status_code == 200 and len(r.json()) == 100 and r.json()[0]["id"] == sorted(adapter_ids())[1]
    for bad in ("!!!", encode_cursor("../etc"), "x" * 200):
        r = server.get("/adapters", params={"cursor": bad})
        assert r.status_code in (400, 422) and "cursor" in r.json()["error"], r.text
    for limit in (0, 1001, -1):
        r = server.get("/adapters", params={"limit": limit})
        assert r.status_code == 422 and "limit" in r.json()["error"], r.text


def test_pages_stay_consistent_while_adapters_come_and_go(tiny_base, tmp_path) -> None:
    """A walk sees every adapter that exists throughout it once, whatever is added or deleted meanwhile."""
    config, weights = make_adapter(tiny_base, r=1, targets=("q_proj",))
    with AdapterStore(tmp_path / "data") as store:
        store.bind_base(linear_shapes(tiny_base), max_rank=8)
        for i in range(0, 40, 2):
            store.put(f"a{i:02d}", AdapterFiles(config=config, weights=weights))
        first = page(store.records(), limit=10)
        store.put("a01", AdapterFiles(config=config, weights=weights))  # behind the cursor: not seen
        store.put("a33", AdapterFiles(config=config, weights=weights))  # ahead: seen
        store.delete("a20")  # the first of the next page
        seen = [r.adapter_id for r in first.records]
        cursor = first.next_cursor
        while cursor is not None:
            nxt = page(store.records(), cursor=cursor, limit=10)
            seen += [r.adapter_id for r in nxt.records]
            cursor = nxt.next_cursor
    kept = [f"a{i:02d}" for i in range(0, 40, 2) if i != 20]
    assert seen == sorted([*kept, "a33"])


def test_the_client_walks_every_page(live) -> None:
    everything = sorted(adapter_ids())
    transport = CountingTransport()
    with LoraplexClient(live.url, transport=transport) as client:
        assert [a.id for a in client.list_adapters()] == everything  # 100 a page by default
        assert len(transport.queries) == 10 and all(q["limit"] == "100" for q in transport.queries)
        assert "cursor" not in transport.queries[0] and all("cursor" in q for q in transport.queries[1:])
        transport.queries.clear()
        team3 = [i for i in everything if i.startswith("team-3-")]
        walked = client.iter_adapters(prefix="team-3-", page_size=50)
        assert next(walked).id == team3[0] and len(transport.queries) == 1  # one page at a time
        assert [team3[0], *(a.id for a in walked)] == team3
        assert len(transport.queries) == -(-len(team3) // 50)
        assert client.list_adapters(prefix="nobody") == []
        with pytest.raises(ValueError, match="page_size"):
            client.list_adapters(page_size=1001)


async def test_the_async_client_walks_every_page(live) -> None:
    transport = AsyncCountingTransport()
    async with AsyncLoraplexClient(live.url, transport=transport) as client:
        ids = [a.id async for a in client.iter_adapters(page_size=300)]
        assert ids == sorted(adapter_ids()) and len(transport.queries) == 4
        team5 = await client.list_adapters(prefix="team-5-", page_size=7)
    assert [a.id for a in team5] == sorted(i for i in adapter_ids() if i.startswith("team-5-"))


def test_the_cli_lists_every_page(live) -> None:
    result = CliRunner().invoke(app, ["adapters", "list", "--json", "--prefix", "team-6-"],
                                env={"LORAPLEX_URL": live.url})  # fmt: skip
    assert result.exit_code == 0, result.output
    team6 = sorted(i for i in adapter_ids() if i.startswith("team-6-"))
    assert len(team6) > 100  # more than one page of the client's default size
    assert [a["id"] for a in json.loads(result.output)] == team6
