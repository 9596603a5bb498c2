"""The consumption sweep starts from the wallet's side: a Play purchase the wallet
credited but of which the receipts service holds no row at all (no purchase row,
no consumption row) is found through ListCreditedPurchases and consumed at Google,
by a real Celery worker. The store simulator, the real wallet, PostgreSQL in CI."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.celery_app import make_celery_app
from services.receipts.google import tasks as google_tasks
from services.receipts.wiring import build_consumer, build_credited_play
from tests.receipts.notifications.system import running_system
from tests.support import env
from tests.support.receipts_backends import SERVER, dropped_queue, thread_worker, unique_queue
from tests.support.tokens import Keys


# One case only: the Play tasks' names are global, so a second app in this process would reach the first's.
@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=SERVER)], indirect=True)
@pytest.mark.timeout(180)
async def test_a_credited_play_purchase_without_any_receipts_row_is_consumed(
    database_url: str, keys: Keys, tmp_path: Path
) -> None:
    broker = env.server_broker_url("redis")
    with dropped_queue(broker, unique_queue()) as queue:
        extra = {"RECEIPTS_QUEUE": queue, "GOOGLE_CONSUME_OVERDUE_SECONDS": "0", "BROKER_URL": broker}
        await _sweep_finds_the_wallets_purchase(database_url, keys, tmp_path, queue, extra)


async def _sweep_finds_the_wallets_purchase(
    database_url: str, keys: Keys, tmp_path: Path, queue: str, extra: dict[str, str]
) -> None:
    async with running_system(database_url, keys, tmp_path, with_worker=False, settings_extra=extra) as s:
        s.push.config.lose_next = 1
        token = s.play.buy("coins_70").token
        # Credited by the wallet (a receipts row lost, or never written), not consumed at Google.
        await s.wallet.stub.CreditPurchase(
            wpb.CreditPurchaseRequest(
                request_id=f"seed-{token}"[:128],
                account_id="fan-orphan",
                store=wpb.STORE_GOOGLE_PLAY,
                store_transaction_id=token,
                product_id="coins_70",
                coins=70,
                quantity=1,
                environment=wpb.STORE_ENVIRONMENT_PRODUCTION,
                storefront="US",
                price=money_pb2.Money(amount_minor=99, currency_code="USD"),
            ),
            metadata=s.wallet.md(),
            timeout=30,
        )
        app = make_celery_app(queue, s.settings.broker_url)
        google_tasks.register(
            app, s.settings, lambda: build_consumer(s.settings), lambda: build_credited_play(s.settings)
        )
        with thread_worker(app, queue):
            app.send_task(google_tasks.SWEEP_TASK, queue=queue)
            deadline = time.monotonic() + 60
            while not s.play.get(token).consumed:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the sweep never consumed the wallet's purchase"
                await asyncio.sleep(0.1)
        assert s.play.get(token).consume_calls == 1  # type: ignore[union-attr]
