"""`python -m services.wallet`: start the wallet service and serve until SIGTERM."""

from __future__ import annotations

import asyncio

from services.common.bootstrap import build_runtime, load, run_main
from services.common.server import run_until_signalled
from services.wallet.config import WalletSettings
from services.wallet.server import SERVICE, build_host


async def serve(settings: WalletSettings) -> None:
    runtime = build_runtime(SERVICE, settings)
    host = build_host(settings, runtime)
    runtime.metrics.serve(settings.bind_host, settings.wallet_metrics_port)

    async def stop() -> None:
        await host.stop()
        runtime.database.close()

    await run_until_signalled(host.start, stop)


def main() -> None:
    run_main(SERVICE, lambda: asyncio.run(serve(load(WalletSettings, SERVICE))))


if __name__ == "__main__":
    main()
