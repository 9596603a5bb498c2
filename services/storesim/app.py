"""The store simulator's HTTP application: App Store, Google Play and PayPal
stand-ins speaking the real wire formats, for development and tests.

It imports none of the coinstore services: it imitates the outside world.
"""

from __future__ import annotations

from aiohttp import web

from services.storesim import apple, apple_notifications, google, paypal, pubsub
from services.storesim.config import StoresimSettings


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(settings: StoresimSettings) -> web.Application:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # PayPal accepts 15,000 items in one payout request: several MiB of JSON.
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/healthz", healthz)
    apple.setup(app, settings)
    google.setup(app, settings)
    paypal.setup(app, settings)
    apple_notifications.setup(app, settings)
    pubsub.setup(app, settings)
    return app
