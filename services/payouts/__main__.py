"""`python -m services.payouts`: start the payouts service and serve until SIGTERM."""

from __future__ import annotations

import asyncio

from services.common.bootstrap import build_runtime, load, run_main
from services.common.server import run_until_signalled
from services.payouts.config import PayoutsSettings
from services.payouts.server import SERVICE, build_host


async def serve(settings: PayoutsSettings) -> None:
    runtime = build_runtime(SERVICE, settings)
    host = build_host(settings, runtime)
    runtime.metrics.serve(settings.bind_host, settings.payouts_metrics_port)

    async def stop() -> None:
        await host.stop()
        runtime.database.close()

    await run_until_signalled(host.start, stop)


def main() -> None:
    run_main(SERVICE, lambda: asyncio.run(serve(load(PayoutsSettings, SERVICE))))


if __name__ == "__main__":
    main()
