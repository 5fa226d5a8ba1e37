"""The route table: for every path, who may call it and where it runs, in one place.

Every rule the server applies by path is read from :data:`ROUTES` (first match wins):

- ``access``: which key the route needs (``server.api.security``), and so which error statuses
  the OpenAPI contract documents (``server.api.openapi_contract``);
- ``generation``: a generation route (deadline, queue place, request metrics: ``middleware``);
- ``upload``: the body is an adapter upload (``--max-upload-mb`` instead of ``--max-body-kb``);
- ``cluster``: where the Ray ingress sends it (``server.cluster.routing``): ``store`` for adapter
  management (one store for the cluster), ``replica`` for what needs the model, ``unsupported``;
- ``names_adapter``: the path's ``{id}`` names an adapter whose weights the route needs (analysis,
  shrink): the request's adapter scope fetches and holds it, and the cluster syncs it to a replica.

Adding a route is one line here; a path no rule matches is a ``read`` route run on a replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Access = Literal["open", "read", "manage", "admin"]
Target = Literal["health", "metrics", "store", "replica", "unsupported"]

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY = frozenset({"*"})
WRITES = frozenset({"!read"})  # every method that is not a read


@dataclass(frozen=True)
class Rule:
    """One row of the table: ``path`` is exact, or ends with ``/*`` (anything below it) and may hold
    ``{id}`` (one path segment)."""

    methods: frozenset[str]
    path: str
    access: Access
    cluster: Target = "replica"
    generation: bool = False
    upload: bool = False
    names_adapter: bool = False

    def matches(self, method: str, path: str) -> bool:
        if "*" not in self.methods:
            read = method in READ_METHODS
            if not (method in self.methods or ("!read" in self.methods and not read)):
                return False
        return _compiled(self.path).match(path) is not None


def _rule(methods: str, path: str, access: Access, **flags: object) -> Rule:
    named = {"*": ANY, "READ": READ_METHODS, "WRITE": WRITES}
    chosen = named.get(methods, frozenset(methods.split("|")))
    return Rule(chosen, path, access, **flags)  # type: ignore[arg-type]


GEN = {"generation": True}
ROUTES: tuple[Rule, ...] = (
    _rule("*", "/health", "open", cluster="health"),
    _rule("*", "/metrics", "open", cluster="metrics"),
    _rule("READ", "/", "open"),  # the web console's page; POST / is generation
    _rule("POST", "/", "read", **GEN),
    _rule("READ", "/console/*", "open"),  # the console's static files: no data in them
    _rule("*", "/admin/tenants/*", "admin", cluster="store"),  # the store deployment owns the tenants
    _rule("*", "/admin/*", "admin"),
    _rule("POST", "/generate", "read", **GEN),
    _rule("POST", "/generate_stream", "read", **GEN),
    _rule("POST", "/v1/completions", "read", **GEN),
    _rule("POST", "/v1/chat/completions", "read", **GEN),
    _rule("POST", "/v1/responses", "read", **GEN),
    _rule("READ", "/adapters", "read", cluster="store"),
    _rule("POST", "/adapters", "manage", cluster="store", upload=True),
    _rule("READ", "/adapters/compare", "read"),  # ?a=&b=, on a replica (needs the base weights)
    _rule("WRITE", "/adapters/compose", "manage", cluster="store"),
    _rule("READ", "/adapters/{id}", "read", cluster="store"),
    _rule("WRITE", "/adapters/{id}", "manage", cluster="store"),
    _rule("READ", "/adapters/{id}/download", "read", cluster="store"),
    _rule("POST", "/adapters/{id}/shrink", "manage", cluster="unsupported", names_adapter=True),
    _rule("READ", "/adapters/{id}/*", "read", names_adapter=True),  # analysis, plots
    _rule("WRITE", "/adapters/{id}/*", "manage", names_adapter=True),
    _rule("WRITE", "/adapters/*", "manage"),
)
DEFAULT = Rule(ANY, "/*", "read")

_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled(template: str) -> re.Pattern[str]:
    pattern = _PATTERNS.get(template)
    if pattern is None:
        body = template[:-2] if template.endswith("/*") else template
        regex = re.escape(body).replace(re.escape("{id}"), "(?P<id>[^/]+)")
        regex += "(/.*)?" if template.endswith("/*") else ""
        pattern = _PATTERNS[template] = re.compile(f"^{regex}$")
    return pattern


def normalize(path: str) -> str:
    return path.rstrip("/") or "/"


def rule_for(method: str, path: str) -> Rule:
    """The first rule of :data:`ROUTES` matching ``method path`` (trailing slashes ignored)."""
    method, path = method.upper(), normalize(path)
    return next((rule for rule in ROUTES if rule.matches(method, path)), DEFAULT)


def path_adapter(method: str, path: str) -> str | None:
    """The adapter id a route's path names (``/adapters/{id}/...``), if its rule says it names one."""
    rule = rule_for(method, path)
    if not rule.names_adapter:
        return None
    match = _compiled(rule.path).match(normalize(path))
    return match.group("id") if match is not None else None
