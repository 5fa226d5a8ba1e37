"""The OpenAPI contract (``/openapi.json``) made honest: every status a route can answer is
documented with its error schema, and the limits that come from the server's settings are stated.

FastAPI documents 200 and 422 only; the statuses that come from app-wide rules (keys, the queue
limit, the model still loading, unknown adapters) are added here from the same rules the server
applies (the route table, ``server.api.routes``), so a new route gets them
too. Token limits come from the running engine: ``max_new_tokens``/``max_tokens`` are at most
``--max-total-tokens`` - 1 (a prompt has at least one token). Only what no schema can state is
left out: a prompt's length in tokens (``inputs`` tokens + ``max_new_tokens`` within the limit)
and the content of an uploaded adapter.

Also answers 405 with an ``Allow`` header that lists every method of the path (Starlette lists
only the first matching route's).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.store import ADAPTER_ID_RE
from server.api.openapi_errors import DESCRIPTIONS, OpenAIErrorResponse
from server.api.routes import rule_for
from server.api.schemas import ErrorResponse

_TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def route_statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses ``method path`` can answer, from the app-wide rules."""
    rule = rule_for(method, path)
    if rule.access == "open":  # /health, /metrics, the console's page
        return set()
    codes = {400, 401, 503}  # a Host not allowed; a key may be required; still loading
    if method not in ("GET", "HEAD", "OPTIONS"):
        codes.add(403)  # a cross-site request while no keys are set (security.screen)
    if rule.access in ("admin", "manage"):
        codes.add(403)  # the API key (or a tenant's key on /admin)
    if operation.get("parameters") or operation.get("requestBody"):
        codes.add(422)
    if operation.get("requestBody"):
        codes |= {400, 413}  # a body that cannot be parsed; over --max-body-kb
    if path.startswith("/adapters"):
        codes |= {400, 404}  # a malformed or unknown adapter id
    if method == "POST" and path.startswith("/adapters"):
        codes |= {408, 409, 413, 429, 507}  # too slow; the id exists; too large; a tenant's quota; disk full
    if path.startswith("/admin/tenants"):
        codes |= {404, 409}  # an unknown tenant; an id taken, or no admin key set (keys_required)
    if rule.generation:
        codes |= {404, 422, 424, 429, 504}
    return codes


def _error_ref(path: str) -> dict[str, Any]:
    name = "OpenAIErrorResponse" if path.startswith("/v1/") else "ErrorResponse"
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _state_limits(schema: dict[str, Any], max_total_tokens: int) -> None:
    """``maximum`` of the token-count fields: what the server accepts with a one-token prompt."""
    for component in schema.get("components", {}).get("schemas", {}).values():
        for name, prop in component.get("properties", {}).items():
            if name not in _TOKEN_FIELDS:
                continue
            for branch in prop.get("anyOf", [prop]):
                if branch.get("type") == "integer":
                    branch["maximum"] = max_total_tokens - 1


def build_schema(app: FastAPI, max_total_tokens: int | None) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse, OpenAIErrorResponse):
        defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(defs.pop("$defs", {}))
        components.setdefault(model.__name__, defs)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for code in sorted(route_statuses(method.upper(), path, operation)):
                responses.setdefault(
                    str(code), {"description": DESCRIPTIONS[code], "content": _error_ref(path)}
                )
    _state_patterns(schema)
    if max_total_tokens is not None:
        _state_limits(schema, max_total_tokens)
    return schema


def documented_methods(schema: dict[str, Any], path: str) -> list[str]:
    """The methods the contract documents for a path (``/adapters/x`` matches ``/adapters/{adapter_id}``)."""
    matches: dict[int, set[str]] = {}  # by number of path parameters: a literal path wins
    for template, item in schema.get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods = matches.setdefault(template.count("{"), set())
            methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    return sorted(matches[min(matches)]) if matches else []


def _state_patterns(schema: dict[str, Any]) -> None:
    """Adapter ids follow ``ADAPTER_ID_RE`` (else 400); ``layers`` is a regular expression (else 422)."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                target = parameter.get("schema", {})
                for branch in target.get("anyOf", [target]):
                    if branch.get("type") != "string":
                        continue
                    if parameter["name"] in ("adapter_id", "a", "b"):
                        branch["pattern"] = ADAPTER_ID_RE.pattern
                    elif parameter["name"] == "layers":
                        branch["format"] = "regex"


def install_openapi_contract(app: FastAPI, settings_max_total_tokens: int) -> None:
    """Replace ``app.openapi`` (cached once the engine runs and its limits are known)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        engine = getattr(app.state, "engine", None)
        limit = engine.config.max_total_tokens if engine is not None else settings_max_total_tokens
        schema = build_schema(app, limit)
        if engine is not None:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(405)
    async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        allowed = documented_methods(app.openapi(), request.url.path)
        return JSONResponse(
            {
                "error": f"method {request.method} is not allowed here; use {', '.join(allowed)}.",
                "error_type": "http",
            },
            status_code=405,
            headers={"Allow": ", ".join(allowed)},
        )
