"""`python -m services.receipts`: start the receipts service and serve until SIGTERM."""

from __future__ import annotations

import asyncio

from services.common.bootstrap import build_runtime, load, run_main
from services.common.celery_app import make_celery_app
from services.common.server import run_until_signalled
from services.receipts.components import build_components
from services.receipts.config import ReceiptsSettings
from services.receipts.notifications import tasks as notification_tasks
from services.receipts.notifications import wiring
from services.receipts.notifications.webhooks import InboxCollector, WebhookServer, create_webhook_app
from services.receipts.server import SERVICE, build_host_with


async def serve(settings: ReceiptsSettings) -> None:
    runtime = build_runtime(SERVICE, settings)
    components = build_components(settings, runtime)
    host = build_host_with(components, runtime)
    celery = make_celery_app(settings.receipts_queue, settings.broker_url)
    dispatch = notification_tasks.sender(celery, settings.receipts_queue)
    deps = wiring.webhook_deps(settings, components, dispatch, asyncio.get_running_loop(), runtime.failpoints)
    runtime.metrics.registry.register(InboxCollector(deps.inbox))  # type: ignore[arg-type]
    webhooks = WebhookServer(create_webhook_app(deps), settings.bind_host, settings.webhook_port)
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
