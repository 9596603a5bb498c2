"""`python -m services.receipts`: start the receipts service (gRPC and the store
webhooks) and serve until SIGTERM."""

from __future__ import annotations

import asyncio

from services.common.bootstrap import build_runtime, load, run_main
from services.common.server import run_until_signalled
from services.receipts.config import ReceiptsSettings
from services.receipts.wiring import SERVICE, build_components, build_host, build_webhooks


async def serve(settings: ReceiptsSettings) -> None:
    runtime = build_runtime(SERVICE, settings)
    components = build_components(settings, runtime)
    host = build_host(components, runtime)
    webhooks = build_webhooks(settings, components, runtime.failpoints)
    runtime.metrics.serve(settings.bind_host, settings.receipts_metrics_port)

    async def start() -> None:
        await host.start()
        await webhooks.start()

    async def stop() -> None:
        await webhooks.stop()
        await host.stop()
        await components.close()
        runtime.database.close()

    await run_until_signalled(start, stop)


def main() -> None:
    run_main(SERVICE, lambda: asyncio.run(serve(load(ReceiptsSettings, SERVICE))))


if __name__ == "__main__":
    main()
