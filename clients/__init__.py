"""Python clients for loraplex (httpx, sync and async). No server code or torch is imported."""

from clients.client import AsyncLoraplexClient, LoraplexClient
from clients.errors import LoraplexError
from clients.types import AdapterSummary, Analysis, Comparison, GenerateResult, ShrinkResult, Token

__all__ = [
    "AdapterSummary",
    "Analysis",
    "AsyncLoraplexClient",
    "Comparison",
    "GenerateResult",
    "LoraplexClient",
    "LoraplexError",
    "ShrinkResult",
    "Token",
]
