"""Server-sent events: the framing and the response every streaming route uses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.api.context import shown_adapter_id
from server.engine.requests import GenerationRequest


def sse(payload: dict) -> str:
    """One event: ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(payload)}\n\n"


def sse_response(events: AsyncIterator[str], request: GenerationRequest) -> StreamingResponse:
    headers = {"x-adapter-id": shown_adapter_id(request.adapter_id) or "", "Cache-Control": "no-cache"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
