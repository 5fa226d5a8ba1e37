"""The web console: ``GET /`` serves ``static/index.html``; ``/console/static/*`` its CSS, its
JavaScript modules and the vendored Chart.js.

Plain files, no build step: the browser loads ES modules straight from the package, so a wheel
install serves the console offline. The page itself holds no data and no secret: it is open
like ``/health`` (``server.api.security``); every request it makes for data carries the key
the user typed, and the server checks it as for any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/console/static"
# Everything the page loads or calls comes from this server (no CDN, no inline script or style;
# a violation would be a browser console error, which the browser tests fail on).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["console"])


@router.get(
    "/",
    response_class=HTMLResponse,
    responses={200: {"description": "The web console's page", "content": {"text/html": {}}}},
)
async def console_page() -> FileResponse:
    """The console's single page (``POST /`` stays TGI's generation route)."""
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


def install_console(app: FastAPI) -> None:
    """Add ``GET /`` and mount the static files."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="console-static")
