"""``GET /adapters`` at scale: 1,000 stored adapters listed page by page (``limit``, ``cursor``), by id prefix.

The adapters are stored through the store API directly (tiny rank-1 adapters) before the server
starts on the same data dir, so the test spends its time listing, not uploading.
"""

from __future__ import annotations

import os
import re

import pytest

from adapters.archive import AdapterFiles
from adapters.listing import encode_cursor, page
from adapters.store import AdapterStore
from tests.adapter_files import linear_shapes, make_adapter
from tests.api_helpers import start_client

N = 1000


def adapter_ids() -> list[str]:
    return [f"team-{i % 7}-adapter-{i:04d}" for i in range(N)]


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("listing")
    config, weights = make_adapter(tiny_base, r=1, targets=("q_proj",))
    # durability is not what this test checks: skip the fsyncs of 1,000 writes (about 30 s on a busy disk)
    with pytest.MonkeyPatch.context() as patch, AdapterStore(tmp / "data") as store:
        patch.setattr(os, "fsync", lambda fd: None)
        store.bind_base(linear_shapes(tiny_base), max_rank=8)
        for adapter_id in adapter_ids():
            store.put(adapter_id, AdapterFiles(config=config, weights=weights))
    client = start_client(tiny_base, tokenizer, tmp)
    yield client
    client.__exit__(None, None, None)


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
