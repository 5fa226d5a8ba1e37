"""Who is calling: the admin, the default tenant (the API key), or a tenant (its key).

Torch-free on purpose: access control (``server.api.security``) needs it before any model code.
What each caller sees and may change is in ``server.api.tenancy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from adapters.tenants import Tenant

ADMIN_LABEL = "_admin"  # metrics and log label of the admin ('_' never starts a tenant id)
DEFAULT_LABEL = "_default"  # the API key's default tenant, and keyless callers


@dataclass(frozen=True)
class Principal:
    kind: Literal["admin", "default", "tenant"]
    tenant: Tenant | None = None

    @property
    def label(self) -> str:
        """The ``tenant`` label of metrics and access log lines."""
        if self.tenant is not None:
            return self.tenant.id
        return ADMIN_LABEL if self.kind == "admin" else DEFAULT_LABEL


ADMIN = Principal("admin")
DEFAULT = Principal("default")
