"""`python -m services.receipts`: start the receipts service and serve until SIGTERM."""

from __future__ import annotations

import asyncio

from services.common.bootstrap import build_runtime, load, run_main
from services.common.server import run_until_signalled
from services.receipts.components import build_components
from services.receipts.config import ReceiptsSettings
from services.receipts.server import SERVICE, build_host_with


async def serve(settings: ReceiptsSettings) -> None:
    runtime = build_runtime(SERVICE, settings)
    components = build_components(settings, runtime)
    host = build_host_with(components, runtime)
    runtime.metrics.serve(settings.bind_host, settings.receipts_metrics_port)

    async def stop() -> None:
        await host.stop()
        await components.close()
        runtime.database.close()

    await run_until_signalled(host.start, stop)


def main() -> None:
    run_main(SERVICE, lambda: asyncio.run(serve(load(ReceiptsSettings, SERVICE))))


if __name__ == "__main__":
    main()
