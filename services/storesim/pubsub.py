"""Cloud Pub/Sub push (Play real-time developer notifications) of the store simulator."""

from __future__ import annotations

from aiohttp import web

from services.storesim.config import StoresimSettings


def setup(app: web.Application, settings: StoresimSettings) -> None:
    """Add this stand-in's routes to the simulator."""
