"""UploadLimitMiddleware: 413 as soon as the body passes the limit, without reading or buffering the rest."""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.api.upload_limit import UploadLimitMiddleware

LIMIT = 1 << 20
CHUNK = 1 << 16


async def reading_app(scope, receive, send) -> None:
    """Reads the whole body (as a multipart parser would), then answers 200 with its size."""
    request = Request(scope, receive)
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
    except Exception:
        response = JSONResponse({"error": "app saw a broken body"}, status_code=400)  # must be replaced
    else:
        response = JSONResponse({"size": size})
    await response(scope, receive, send)


def client() -> httpx.AsyncClient:
    app = UploadLimitMiddleware(reading_app, max_bytes=LIMIT)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_streamed_body_is_cut_off_at_the_limit() -> None:
    pulled = {"bytes": 0}

    async def body():
        for _ in range(64):  # 4 MiB on offer
            pulled["bytes"] += CHUNK
            yield b"\0" * CHUNK

    async with client() as c:
        r = await c.post("/adapters", content=body())
    assert r.status_code == 413
    assert r.json()["error_type"] == "too_large" and "--max-upload-mb" in r.json()["error"]
    assert pulled["bytes"] <= LIMIT + 2 * CHUNK  # stopped reading right after the limit


async def test_declared_length_is_refused_before_reading() -> None:
    async with client() as c:
        r = await c.post("/adapters", content=b"\0" * (LIMIT + 1))
    assert r.status_code == 413 and f"{LIMIT + 1} bytes" in r.json()["error"]


async def test_bodies_within_the_limit_and_other_routes_pass() -> None:
    async with client() as c:
        assert (await c.post("/adapters", content=b"\0" * LIMIT)).json() == {"size": LIMIT}
        assert (await c.post("/adapters/", content=b"x")).json() == {"size": 1}
        assert (await c.post("/generate", content=b"\0" * (2 * LIMIT))).json() == {"size": 2 * LIMIT}


async def test_every_other_route_has_its_own_body_limit() -> None:
    """Issue 31, finding 1: bodies of every route are limited (--max-body-kb), declared or streamed,
    and a /v1 route's refusal has OpenAI's error shape."""
    small = 4096
    app = UploadLimitMiddleware(reading_app, max_bytes=LIMIT, body_max_bytes=small)
    pulled = {"bytes": 0}

    async def body():
        for _ in range(64):
            pulled["bytes"] += 1024
            yield b"\0" * 1024

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.post("/generate", content=body())
        assert r.status_code == 413 and "--max-body-kb" in r.json()["error"]
        assert pulled["bytes"] <= small + 2048
        r = await c.post("/v1/chat/completions", content=b"\0" * (small + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert (await c.post("/generate", content=b"\0" * small)).json() == {"size": small}
        assert (await c.post("/adapters", content=b"\0" * (small * 4))).json() == {"size": small * 4}
