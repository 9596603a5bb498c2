"""`python -m services.storesim`: run the store simulator."""

from __future__ import annotations

from aiohttp import web

from services.common.bootstrap import load, run_main
from services.storesim.app import create_app
from services.storesim.config import StoresimSettings


def main() -> None:
    def start() -> None:
        settings = load(StoresimSettings, "storesim")  # type: ignore[type-var]
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            ssl_context=settings.ssl_context(),
            print=None,
        )

    run_main("storesim", start)


if __name__ == "__main__":
    main()
