"""Errors the engine raises to its callers (torch-free, so the API's error table can import it)."""

from __future__ import annotations


class RequestRejected(ValueError):
    """A request the engine will not run (too long, bad parameters); the HTTP layer makes it a 422."""
