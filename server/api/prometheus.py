"""GET /metrics: the app's Prometheus metrics (see ``server.metrics``).

Open like /health (no key): it holds counts, latencies and adapter ids, never prompts or
outputs. Keep it off public networks, or put it behind your proxy's auth, if adapter ids are
themselves sensitive.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
