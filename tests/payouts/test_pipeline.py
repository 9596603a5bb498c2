"""The batch pipeline end to end: the payouts gRPC service, a real Celery worker subprocess
(with beat, so the sweeper runs), a real broker, the PayPal simulator and a wallet."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kombu.connection import Connection

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from services.common.celery_app import make_celery_app
from services.payouts.config import PayoutsSettings
from tests.payouts.conftest import start_service
from tests.payouts.fake_wallet import FakeWallet, FakeWalletServer
from tests.payouts.harness import PayPalSimServer, Worker, payouts_settings, settings_env, wait_for, write_catalog
from tests.support import env
from tests.support.tokens import Keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@dataclass
class Stack:
    stub: pb_grpc.PayoutServiceAsyncStub
    settings: PayoutsSettings
    keys: Keys
    wallet: FakeWallet
    paypal: PayPalSimServer
    tmp_path: Path
    workers: list[Worker]
    address: str = ""

    def ops(self) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata("payouts:ops", subject="ops")

    def app(self) -> tuple[tuple[str, str], ...]:
        return self.keys.metadata("payouts:request", subject="app-backend")

    def worker(self, **kwargs: Any) -> Worker:
        worker = Worker(self.settings, self.tmp_path / f"worker-{len(self.workers)}", **kwargs).start()
        self.workers.append(worker)
        return worker

    async def creators(self, count: int, diamonds: int = 10_000, receivers: dict[int, str] | None = None) -> list[str]:
        ids = []
        for i in range(count):
            creator = f"creator-{i}"
            receiver = (receivers or {}).get(i, f"creator{i}@example.com")
            self.wallet.credit(creator, diamonds)
            await self.stub.SetPayoutDestination(
                pb.SetPayoutDestinationRequest(
                    request_id=f"d-{creator}",
                    creator_account_id=creator,
                    destination=pb.PayoutDestination(provider=pb.PROVIDER_PAYPAL, receiver=receiver),
                ),
                metadata=self.app(),
            )
            await self.stub.VerifyPayoutDestination(
                pb.VerifyPayoutDestinationRequest(request_id=f"v-{creator}", creator_account_id=creator),
                metadata=self.ops(),
            )
            await self.stub.RequestCashout(
                pb.RequestCashoutRequest(request_id=f"r-{creator}", creator_account_id=creator, diamonds=diamonds),
                metadata=self.app(),
            )
            ids.append(creator)
        return ids

    async def batch(self, batch_id: str) -> pb.PayoutBatch:
        reply = await self.stub.GetPayoutBatch(pb.GetPayoutBatchRequest(batch_id=batch_id), metadata=self.ops())
        return reply.batch

    async def items(self, batch_id: str) -> list[pb.Cashout]:
        reply = await self.stub.ListBatchItems(pb.ListBatchItemsRequest(batch_id=batch_id), metadata=self.ops())
        return list(reply.cashouts)

    async def completed(self, batch_id: str, timeout: float = 90) -> pb.PayoutBatch:
        deadline = time.monotonic() + timeout
        while True:
            batch = await self.batch(batch_id)
            if batch.state == pb.BATCH_STATE_COMPLETED:
                return batch
            if time.monotonic() > deadline:
                logs = "\n".join(w.output() for w in self.workers)
                raise AssertionError(f"batch not completed: {batch}\n{logs}")
            await asyncio.sleep(0.3)


def reachable(broker_url: str) -> None:
    if broker_url.startswith("sqla+"):
        return
    try:
        with Connection(broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        env.unavailable(f"broker {broker_url} unreachable: {exc}")


async def make_stack(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    keys: Keys,
    wallet: FakeWalletServer,
    paypal: PayPalSimServer,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    reachable(broker_url)
    settings = payouts_settings(
        database_url=database_url,
        broker_url=broker_url,
        catalog=write_catalog(tmp_path),
        keys=keys,
        wallet_address=wallet.address,
        paypal_url=paypal.api_url,
        **overrides,
    )
    host, database, channel = await start_service(settings)
    stack = Stack(
        pb_grpc.PayoutServiceStub(channel),
        settings,
        keys,
        wallet.wallet,
        paypal,
        tmp_path,
        [],
        f"127.0.0.1:{host.port}",  # type: ignore[attr-defined]
    )
    try:
        yield stack
    finally:
        for worker in stack.workers:
            worker.stop()
        await channel.close(None)
        await host.stop()  # type: ignore[attr-defined]
        database.close()
        if not broker_url.startswith("sqla+"):
            purge(broker_url, settings.payout_queue)


def purge(broker_url: str, queue: str) -> None:
    app = make_celery_app("purge", broker_url)
    with contextlib.suppress(Exception), app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


def paid_once(paypal: PayPalSimServer, items: list[pb.Cashout]) -> Counter[str]:
    """Every payment the simulator made, by sender_item_id; asserts none was made twice."""
    payments = paypal.payments()["payments"]
    counts = Counter(p["sender_item_id"] for p in payments)
    assert counts
    assert max(counts.values()) == 1, counts
    per_cashout = Counter(
        p["sender_item_id"].rsplit("-", 1)[0] for p in payments if p["transaction_status"] == "SUCCESS"
    )
    assert all(per_cashout[c.cashout_id] <= 1 for c in items), per_cashout
    return counts


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, keys: Keys, fake_wallet: FakeWalletServer, paypal: PayPalSimServer
) -> AsyncIterator[Stack]:
    async for value in make_stack(
        tmp_path, database_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}", keys, fake_wallet, paypal
    ):
        yield value


async def test_batch_settles_every_item_and_retry_pays_the_failed(stack: Stack) -> None:
    locked, unclaimed = "locked@example.com", "nobody@example.com"
    stack.paypal.faults(
        final_delay_seconds=0.8, receiver_outcomes={locked: "FAILED:RECEIVER_ACCOUNT_LOCKED", unclaimed: "UNCLAIMED"}
    )
    creators = await stack.creators(7, receivers={2: locked, 5: unclaimed})
    stack.worker()
    created = await stack.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="b1"), metadata=stack.ops())
    batch_id = created.batch.batch_id
    batch = await stack.completed(batch_id)
    items = {c.creator_account_id: c for c in await stack.items(batch_id)}
    assert len(items) == 7
    for index, creator in enumerate(creators):
        item = items[creator]
        assert item.attempt == 1
        assert item.provider_item_id
        assert item.sender_batch_id
        assert item.sender_item_id == f"{item.cashout_id}-1"
        if index in (2, 5):
            assert item.state == pb.CASHOUT_STATE_FAILED
            assert stack.wallet.releases[item.cashout_id] == 1
            assert stack.wallet.balance(creator) == 10_000
        else:
            assert item.state == pb.CASHOUT_STATE_PAID, item
            assert item.provider_transaction_id
            assert stack.wallet.commits[item.cashout_id] == 1
            assert stack.wallet.balance(creator) == 0
    assert items[creators[2]].failure_reason == "RECEIVER_ACCOUNT_LOCKED"
    assert items[creators[5]].failure_reason == "RECEIVER_UNREGISTERED"
    # The unclaimed payout was taken back before the diamonds were returned.
    returned = [p for p in stack.paypal.payments()["payments"] if p["receiver"] == unclaimed]
    assert [p["transaction_status"] for p in returned] == ["RETURNED"]
    totals = {t.state: (t.count, t.diamonds, t.amount.amount_minor) for t in batch.totals}
    assert totals == {pb.CASHOUT_STATE_PAID: (5, 50_000, 25_000), pb.CASHOUT_STATE_FAILED: (2, 20_000, 10_000)}
    paid_once(stack.paypal, list(items.values()))

    # Ops fix the receivers and retry: the failed items are paid in a new attempt, the paid ones are untouched.
    stack.paypal.faults(final_delay_seconds=0, receiver_outcomes={locked: "SUCCESS", unclaimed: "SUCCESS"})
    retried = await stack.stub.RetryFailedItems(
        pb.RetryFailedItemsRequest(request_id="retry-1", batch_id=batch_id), metadata=stack.ops()
    )
    assert retried.retried_count == 2
    await stack.completed(batch_id)
    after = {c.creator_account_id: c for c in await stack.items(batch_id)}
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in after.values())
    assert after[creators[2]].attempt == 2
    assert stack.wallet.commits[f"{after[creators[2]].cashout_id}.2"] == 1
    assert all(stack.wallet.balance(c) == 0 for c in creators)
    counts = paid_once(stack.paypal, list(after.values()))
    assert len(counts) == 9
    # Conservation: every credited diamond is either with its creator or committed exactly once.
    committed = sum(h.diamonds for h in stack.wallet.holds.values() if h.state == 2)
    assert committed + sum(stack.wallet.balance(c) for c in creators) == 70_000


async def test_provider_errors_and_timeout_after_paying_pay_once(stack: Stack) -> None:
    # One 500 (nothing paid), then a payout that is paid but whose answer never arrives in time.
    stack.paypal.faults(submit_errors=1, submit_timeouts=1, stall_seconds=5)
    await stack.creators(4)
    stack.worker()
    created = await stack.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="bt"), metadata=stack.ops())
    await stack.completed(created.batch.batch_id)
    items = await stack.items(created.batch.batch_id)
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in items)
    report = stack.paypal.payments()
    assert report["duplicates"] >= 1, "the retry after the timeout must have met the duplicate sender_batch_id"
    assert len(paid_once(stack.paypal, items)) == 4
    assert all(stack.wallet.commits[c.cashout_id] == 1 for c in items)


async def test_same_batch_twice_and_retry_while_in_flight_pay_once(stack: Stack) -> None:
    stack.paypal.faults(final_delay_seconds=3)
    await stack.creators(6)
    stack.worker()
    request = pb.CreatePayoutBatchRequest(request_id="twice")
    created = await stack.stub.CreatePayoutBatch(request, metadata=stack.ops())
    batch_id = created.batch.batch_id
    assert (await stack.stub.CreatePayoutBatch(request, metadata=stack.ops())).batch.batch_id == batch_id

    async def in_flight() -> bool:
        return any(c.state == pb.CASHOUT_STATE_SUBMITTED for c in await stack.items(batch_id))

    deadline = time.monotonic() + 60
    while not await in_flight():
        assert time.monotonic() < deadline, stack.workers[0].output()
        await asyncio.sleep(0.2)
    retried = await stack.stub.RetryFailedItems(
        pb.RetryFailedItemsRequest(request_id="retry-early", batch_id=batch_id), metadata=stack.ops()
    )
    assert retried.retried_count == 0
    # Deliver every step of the batch again, as a broker redelivering or an operator re-running would.
    app = make_celery_app("payouts", stack.settings.broker_url)
    chunk_ids = {c.sender_batch_id for c in await stack.items(batch_id)}
    for _ in range(2):
        app.send_task("payouts.plan_batch", args=[batch_id], queue=stack.settings.payout_queue)
        for chunk_id in chunk_ids:
            app.send_task("payouts.submit_chunk", args=[chunk_id], queue=stack.settings.payout_queue)
            app.send_task("payouts.poll_chunk", args=[chunk_id], queue=stack.settings.payout_queue)
    await stack.completed(batch_id)
    items = await stack.items(batch_id)
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in items)
    assert len(paid_once(stack.paypal, items)) == 6
    assert all(stack.wallet.commits[c.cashout_id] == 1 for c in items)
    # And once more after completion: nothing moves.
    for chunk_id in chunk_ids:
        app.send_task("payouts.submit_chunk", args=[chunk_id], queue=stack.settings.payout_queue)
    await asyncio.sleep(2)
    assert len(paid_once(stack.paypal, items)) == 6


@pytest.fixture
async def broker_stack(
    tmp_path: Path, broker_url: str, keys: Keys, fake_wallet: FakeWalletServer, paypal: PayPalSimServer
) -> AsyncIterator[Stack]:
    database_url = f"sqlite:///{tmp_path / f'payouts-{uuid.uuid4().hex[:6]}.db'}"
    async for value in make_stack(tmp_path, database_url, broker_url, keys, fake_wallet, paypal, payout_chunk_size=3):
        yield value


async def test_sigkill_mid_batch_then_restart_pays_each_item_once(broker_stack: Stack) -> None:
    stack = broker_stack
    stack.paypal.faults(final_delay_seconds=1.5)
    await stack.creators(12)
    worker = stack.worker()
    created = await stack.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="kill"), metadata=stack.ops())
    batch_id = created.batch.batch_id
    await wait_for(lambda: len(stack.paypal.payments()["payments"]) >= 3, 60, "a first submission", worker)
    worker.kill()
    assert (await stack.batch(batch_id)).state != pb.BATCH_STATE_COMPLETED
    stack.worker()
    await stack.completed(batch_id, timeout=120)
    items = await stack.items(batch_id)
    assert len(items) == 12
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in items)
    assert len(paid_once(stack.paypal, items)) == 12
    assert all(stack.wallet.commits[c.cashout_id] == 1 for c in items)


async def test_refused_grpc_without_ops_scope(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.RetryFailedItems(
            pb.RetryFailedItemsRequest(request_id="x", batch_id="y"), metadata=stack.app()
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def cli(stack: Stack, *argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "payouts",
        "--address",
        stack.address,
        *argv,
        env=settings_env(stack.settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.fixture
async def sqlite_stack(
    tmp_path: Path, sqlite_url: str, keys: Keys, fake_wallet: FakeWalletServer, paypal: PayPalSimServer
) -> AsyncIterator[Stack]:
    async for value in make_stack(
        tmp_path, sqlite_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}", keys, fake_wallet, paypal
    ):
        yield value


async def test_ops_cli_runs_and_reports_a_batch(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    stack.paypal.faults(final_delay_seconds=1, receiver_outcomes={"gone@example.com": "FAILED"})
    await stack.creators(3, receivers={1: "gone@example.com"})
    preview = await cli(stack, "create-batch", "--dry-run")
    assert "(dry run)" in preview
    assert "3 items" in preview
    assert "150.00 USD" in preview
    stack.worker()
    created = await cli(stack, "create-batch", "--request-id", "cli-batch-1")
    batch_id = created.split()[1]
    assert batch_id.startswith("pb_")
    status = await cli(stack, "status", batch_id, "--interval", "0.3")
    assert "COMPLETED" in status
    assert batch_id in await cli(stack, "list")
    rows = list(csv.DictReader(io.StringIO(await cli(stack, "report", batch_id, "--csv"))))
    assert len(rows) == 3
    by_state = Counter(r["state"] for r in rows)
    assert by_state == {"PAID": 2, "FAILED": 1}
    failed = next(r for r in rows if r["state"] == "FAILED")
    assert failed["receiver"] == "gone@example.com"
    assert failed["failure_reason"] == "RECEIVER_ACCOUNT_LOCKED"
    paid = next(r for r in rows if r["state"] == "PAID")
    assert (paid["diamonds"], paid["amount"], paid["currency"]) == ("10000", "50.00", "USD")
    assert paid["provider_item_id"]
    assert paid["provider_transaction_id"]
    assert paid["sender_item_id"] == f"{paid['cashout_id']}-1"
    retried = await cli(stack, "retry", batch_id)
    assert retried.startswith("1 failed items")


async def test_daily_batch_is_created_once_per_day(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    await stack.creators(2)
    stack.worker()
    app = make_celery_app("payouts", stack.settings.broker_url)
    for _ in range(3):
        app.send_task("payouts.daily_batch", queue=stack.settings.payout_queue)

    async def batches() -> list[pb.PayoutBatch]:
        reply = await stack.stub.ListPayoutBatches(pb.ListPayoutBatchesRequest(), metadata=stack.ops())
        return list(reply.batches)

    deadline = time.monotonic() + 60
    while not await batches():
        assert time.monotonic() < deadline, stack.workers[0].output()
        await asyncio.sleep(0.3)
    (batch,) = await batches()
    await stack.completed(batch.batch_id)
    await asyncio.sleep(1)
    assert len(await batches()) == 1
    assert len(paid_once(stack.paypal, await stack.items(batch.batch_id))) == 2
    # A cash-out requested after today's batch waits for tomorrow's: the day's batch
    # request id replays, it does not open a second batch that would take it.
    stack.wallet.credit("creator-0", 10_000)
    late = await stack.stub.RequestCashout(
        pb.RequestCashoutRequest(request_id="r-late", creator_account_id="creator-0", diamonds=10_000),
        metadata=stack.app(),
    )
    app.send_task("payouts.daily_batch", queue=stack.settings.payout_queue)
    await asyncio.sleep(3)
    assert len(await batches()) == 1
    again = await stack.stub.GetCashout(pb.GetCashoutRequest(cashout_id=late.cashout.cashout_id), metadata=stack.app())
    assert again.cashout.state == pb.CASHOUT_STATE_REQUESTED
