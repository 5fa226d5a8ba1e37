"""Admin routes: POST /admin/verify-base."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.api.deps import EngineDep

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/verify-base")
async def verify_base(engine: EngineDep) -> dict:
    """Prove the base weights are bit-for-bit those loaded, however many swaps happened.

    Waits for a moment when no adapter is merged: if one is, new rows of it stop being admitted,
    the batch drains, the base is restored, and the target weights are hashed.
    """
    return await asyncio.wrap_future(engine.verify_base())
