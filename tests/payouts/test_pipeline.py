"""The batch pipeline end to end: the payouts gRPC service, a real Celery worker subprocess
(with beat, so the sweeper runs), a real broker, the PayPal simulator and a wallet."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import csv
import io
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from celery import Celery

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.celery_app import make_celery_app
from services.common.db import Database
from services.payouts.cli import STILL_RUNNING
from services.payouts.config import PayoutsSettings
from services.payouts.store import chunks
from tests.payouts.conftest import start_service
from tests.payouts.fake_wallet import COMMIT, RELEASE, FakeWallet, FakeWalletServer
from tests.payouts.harness import (
    PayPalSimServer,
    Worker,
    exit_status,
    payouts_settings,
    settings_env,
    worker_log,
    write_catalog,
)
from tests.support import env
from tests.support.databases import postgres_database, sqlite_database
from tests.support.failpoints import failpoint_env, fired_pid
from tests.support.tokens import Keys
from tests.support.waiting import eventually

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

    def celery(self) -> Celery:
        return make_celery_app("payouts-test", self.settings.broker_url)

    def send(self, app: Celery, task: str, *args: str) -> str:
        """Queue ``task`` under a task id of our own, to find its result in the worker log."""
        task_id = f"test-{uuid.uuid4().hex}"
        app.send_task(task, args=list(args), queue=self.settings.payout_queue, task_id=task_id)
        return task_id

    async def results(self, task_ids: Iterable[str], timeout: float = 60) -> dict[str, Any]:
        """Wait until every task has run and returned; what each returned.

        The evidence is Celery's own "Task …[id] succeeded" line, so "nothing moved"
        is asserted after the work ran, never after a sleep that may have been too short."""
        wanted = set(task_ids)

        def returned() -> dict[str, str] | None:
            seen: dict[str, str] = {}
            for worker in self.workers:
                seen.update(worker.results())
            return seen if wanted <= seen.keys() else None

        seen = await eventually(
            returned, f"tasks {sorted(wanted)}", timeout, interval=0.2, detail=worker_log(self.workers[-1])
        )
        return {task_id: ast.literal_eval(seen[task_id]) for task_id in wanted}

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
                pb.VerifyPayoutDestinationRequest(
                    request_id=f"v-{creator}",
                    creator_account_id=creator,
                    provider=pb.PROVIDER_PAYPAL,
                    receiver=receiver,
                ),
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


async def make_stack(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    keys: Keys,
    wallet: FakeWalletServer,
    paypal: PayPalSimServer,
    **overrides: Any,
) -> AsyncIterator[Stack]:
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
            worker.kill()  # the test is over: a graceful shutdown would only cost seconds
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


def committed_once(wallet: FakeWallet, reservation_ids: Iterable[str], *, replays: bool = False) -> None:
    """Each reservation was committed under one request id and never released.

    Without crashes or redeliveries (``replays=False``) the wallet received exactly one
    commit call per reservation. With them, a commit may be sent again, but only under
    the same request id, which the wallet answers with the original response: a second
    request id would be a second, different commit."""
    for reservation_id in reservation_ids:
        request_ids = wallet.request_ids(COMMIT, reservation_id)
        assert len(request_ids) == 1, (reservation_id, request_ids)
        if not replays:
            assert wallet.commits[reservation_id] == 1, (reservation_id, request_ids)
        assert wallet.releases[reservation_id] == 0, reservation_id
        assert wallet.state(reservation_id) == wpb.RESERVATION_STATE_COMMITTED, reservation_id


@pytest.fixture
def stack_overrides() -> dict[str, Any]:
    """Settings a test changes for its stack (parametrize ``stack_overrides`` to set them)."""
    return {}


@pytest.fixture
async def stack(
    tmp_path: Path,
    database_url: str,
    keys: Keys,
    fake_wallet: FakeWalletServer,
    paypal: PayPalSimServer,
    stack_overrides: dict[str, Any],
) -> AsyncIterator[Stack]:
    async for value in make_stack(
        tmp_path, database_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}", keys, fake_wallet, paypal, **stack_overrides
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
            assert stack.wallet.commits[item.cashout_id] == 0
            assert stack.wallet.balance(creator) == 10_000
        else:
            assert item.state == pb.CASHOUT_STATE_PAID, item
            assert item.provider_transaction_id
            committed_once(stack.wallet, [item.cashout_id])
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
    committed_once(stack.wallet, [f"{after[creators[i]].cashout_id}.2" for i in (2, 5)])
    # The first attempt's holds stay released; the paid items were not committed again.
    assert all(stack.wallet.releases[after[creators[i]].cashout_id] == 1 for i in (2, 5))
    committed_once(stack.wallet, [after[c].cashout_id for i, c in enumerate(creators) if i not in (2, 5)])
    assert all(stack.wallet.balance(c) == 0 for c in creators)
    counts = paid_once(stack.paypal, list(after.values()))
    assert len(counts) == 9
    # Conservation: every credited diamond is either with its creator or committed exactly once.
    committed = sum(h.diamonds for h in stack.wallet.holds.values() if h.state == 2)
    assert committed + sum(stack.wallet.balance(c) for c in creators) == 70_000


@pytest.mark.parametrize("stack_overrides", [{"paypal_timeout_seconds": 2.0}], ids=["paypal-timeout-2s"])
async def test_provider_errors_and_timeout_after_paying_pay_once(stack: Stack) -> None:
    # One 500 (nothing paid), then a payout that is paid but whose answer never arrives:
    # the simulator stalls far beyond the client's timeout, however busy the machine.
    stack.paypal.faults(submit_errors=1, submit_timeouts=1, stall_seconds=120)
    creators = await stack.creators(4)
    stack.worker()
    created = await stack.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="bt"), metadata=stack.ops())
    await stack.completed(created.batch.batch_id)
    items = await stack.items(created.batch.batch_id)
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in items)
    report = stack.paypal.payments()
    assert report["duplicates"] >= 1, "the retry after the timeout must have met the duplicate sender_batch_id"
    assert len(paid_once(stack.paypal, items)) == 4
    committed_once(stack.wallet, [c.cashout_id for c in items])
    assert all(stack.wallet.balance(c) == 0 for c in creators)


async def test_a_hold_already_committed_parks_its_submission_and_nothing_is_sent(stack: Stack) -> None:
    creators = await stack.creators(3)
    # One creator's hold was paid through some other submission: only ops can untangle that.
    (paid,) = [reservation for reservation, hold in stack.wallet.holds.items() if hold.account_id == creators[0]]
    stack.wallet.holds[paid].state = wpb.RESERVATION_STATE_COMMITTED
    stack.worker()
    created = await stack.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="bp"), metadata=stack.ops())
    database = Database.from_url(stack.settings.database_url, 1)

    def submissions() -> list[Any] | None:
        with database.connect() as conn:
            rows = conn.execute(
                sa.select(chunks.c.state, chunks.c.park_reason).where(chunks.c.batch_id == created.batch.batch_id)
            ).all()
        return list(rows) if rows and all(row.state != "PENDING" for row in rows) else None

    try:
        # Evidence the submission was handled: the wallet was asked, and the chunk left PENDING.
        rows = await eventually(
            submissions, "the submission to be handled", 60, interval=0.2, detail=worker_log(stack.workers[-1])
        )
    finally:
        database.close()
    assert [row.state for row in rows] == ["PARKED"]
    assert paid in rows[0].park_reason
    assert stack.wallet.submit_calls >= 1
    assert stack.paypal.payments()["payments"] == []
    assert all(stack.wallet.commits[r] == 0 and stack.wallet.releases[r] == 0 for r in stack.wallet.holds)


async def test_same_batch_twice_and_retry_while_in_flight_pay_once(stack: Stack) -> None:
    # Items stay PENDING at PayPal until the test lets them settle: "in flight" is a state, not a race.
    stack.paypal.faults(final_delay_seconds=3600)
    creators = await stack.creators(6)
    stack.worker()
    request = pb.CreatePayoutBatchRequest(request_id="twice")
    created = await stack.stub.CreatePayoutBatch(request, metadata=stack.ops())
    batch_id = created.batch.batch_id
    assert (await stack.stub.CreatePayoutBatch(request, metadata=stack.ops())).batch.batch_id == batch_id

    async def all_submitted() -> bool:
        return all(c.state == pb.CASHOUT_STATE_SUBMITTED for c in await stack.items(batch_id))

    deadline = time.monotonic() + 60
    while not await all_submitted():
        assert time.monotonic() < deadline, stack.workers[0].output()
        await asyncio.sleep(0.2)
    retried = await stack.stub.RetryFailedItems(
        pb.RetryFailedItemsRequest(request_id="retry-early", batch_id=batch_id), metadata=stack.ops()
    )
    assert retried.retried_count == 0
    # Deliver every step of the batch again, as a broker redelivering or an operator re-running would.
    app = stack.celery()
    chunk_ids = {c.sender_batch_id for c in await stack.items(batch_id)}
    assert len(chunk_ids) == 2
    sent = []
    for _ in range(2):
        sent.append(stack.send(app, "payouts.plan_batch", batch_id))
        for chunk_id in chunk_ids:
            sent.append(stack.send(app, "payouts.submit_chunk", chunk_id))
            sent.append(stack.send(app, "payouts.poll_chunk", chunk_id))
    await stack.results(sent)
    # All of them ran while the items were in flight: nothing was paid twice, nothing settled yet.
    assert len(paid_once(stack.paypal, await stack.items(batch_id))) == 6
    assert stack.wallet.calls == []

    stack.paypal.faults(final_delay_seconds=0)
    await stack.completed(batch_id)
    items = await stack.items(batch_id)
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in items)
    assert len(paid_once(stack.paypal, items)) == 6
    # Redelivered polls may settle the same item concurrently: same request id, one commit.
    committed_once(stack.wallet, [c.cashout_id for c in items], replays=True)
    assert all(stack.wallet.balance(c) == 0 for c in creators)

    # And once more after completion: every step runs again, and nothing moves.
    sent = [stack.send(app, "payouts.plan_batch", batch_id)]
    for chunk_id in chunk_ids:
        sent.append(stack.send(app, "payouts.submit_chunk", chunk_id))
        sent.append(stack.send(app, "payouts.poll_chunk", chunk_id))
    await stack.results(sent)
    assert len(paid_once(stack.paypal, items)) == 6
    committed_once(stack.wallet, [c.cashout_id for c in items], replays=True)
    assert all(stack.wallet.balance(c) == 0 for c in creators)
    assert (await stack.batch(batch_id)).state == pb.BATCH_STATE_COMPLETED


# The crash points of services/payouts/domain/pipeline.py, in the order a batch meets them.
KILL_POINTS = ("payouts.submit.after_provider", "payouts.poll.before_settle", "payouts.settle.after_wallet")

CRASH_BACKENDS = [
    pytest.param(("sqlite", "embedded"), id="sqlite-embedded"),
    pytest.param(("postgres", "redis"), id="postgres-redis", marks=[pytest.mark.postgres, pytest.mark.broker]),
    pytest.param(("postgres", "rabbitmq"), id="postgres-rabbitmq", marks=[pytest.mark.postgres, pytest.mark.broker]),
]


@pytest.fixture(params=CRASH_BACKENDS)
async def crash_stack(
    request: pytest.FixtureRequest, tmp_path: Path, keys: Keys, fake_wallet: FakeWalletServer, paypal: PayPalSimServer
) -> AsyncIterator[Stack]:
    """SQLite with the embedded broker, and PostgreSQL with each server broker."""
    database, broker = request.param
    broker_url = f"sqla+sqlite:///{tmp_path / 'broker.db'}" if broker == "embedded" else env.server_broker_url(broker)
    with sqlite_database(tmp_path) if database == "sqlite" else postgres_database() as database_url:
        async for value in make_stack(
            tmp_path, database_url, broker_url, keys, fake_wallet, paypal, payout_chunk_size=3, payout_stuck_seconds=3.0
        ):
            yield value


async def test_worker_killed_at_each_crash_point_then_restarted_pays_each_item_once(crash_stack: Stack) -> None:
    stack = crash_stack
    creators = await stack.creators(12)
    points = stack.tmp_path / "failpoints"
    # Every worker gets the same points; each fires once across them all. So the first worker
    # dies (with its pool) at the first point, its replacement runs through that one and dies
    # at the next, and the fourth worker meets no armed point and finishes the batch.
    armed = failpoint_env(points, *(f"{point}=kill-group" for point in KILL_POINTS))
    worker = stack.worker(env=armed)
    created = await stack.stub.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="kill"), metadata=stack.ops())
    batch_id = created.batch.batch_id
    fired: list[str] = []
    while len(fired) < len(KILL_POINTS):
        assert await exit_status(worker) == -signal.SIGKILL, worker.output()
        new = [p for p in KILL_POINTS if p not in fired and fired_pid(points, p) is not None]
        assert new, f"the worker died without firing a failpoint:\n{worker.output()}"
        fired += new
        assert (await stack.batch(batch_id)).state != pb.BATCH_STATE_COMPLETED
        worker = stack.worker(env=armed)
    assert fired == list(KILL_POINTS)
    await stack.completed(batch_id, timeout=120)

    items = await stack.items(batch_id)
    assert len(items) == 12
    assert all(c.state == pb.CASHOUT_STATE_PAID for c in items)
    assert len(paid_once(stack.paypal, items)) == 12
    # The submission killed before it was recorded was sent again; PayPal knew its id.
    assert stack.paypal.payments()["duplicates"] >= 1
    # The commits killed before they were marked settled were sent again, under the same request id.
    committed_once(stack.wallet, [c.cashout_id for c in items], replays=True)
    assert any(stack.wallet.commits[c.cashout_id] > 1 for c in items), stack.wallet.commits
    assert all(stack.wallet.balance(c) == 0 for c in creators)


async def test_refused_grpc_without_ops_scope(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.RetryFailedItems(
            pb.RetryFailedItemsRequest(request_id="x", batch_id="y"), metadata=stack.app()
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def cli(stack: Stack, *argv: str, status: int = 0) -> str:
    """The payouts CLI's output; it must exit with ``status``."""
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
    assert process.returncode == status, err.decode()
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
    creators = await stack.creators(3, receivers={1: "gone@example.com"})
    preview = await cli(stack, "create-batch", "--dry-run")
    assert preview.splitlines() == ["batch (dry run)  UNSPECIFIED  3 items  30000 diamonds  150.00 USD"]
    stack.worker()
    created = await cli(stack, "create-batch", "--request-id", "cli-batch-1")
    batch_id = created.split()[1]
    assert batch_id.startswith("pb_")
    # Who created the batch: the CLI's own operator token (development: minted as ops-cli).
    created_by = "  created by ops-cli, request cli-batch-1"
    assert created.splitlines() == [
        f"batch {batch_id}  CREATED  3 items  30000 diamonds  150.00 USD",
        "  BATCHED           3 items  150.00 USD",
        created_by,
    ]
    status = await cli(stack, "status", batch_id, "--interval", "0.3")
    assert status.splitlines() == [
        f"batch {batch_id}  COMPLETED  3 items  30000 diamonds  150.00 USD",
        "  FAILED            1 items  50.00 USD",
        "  PAID              2 items  100.00 USD",
        created_by,
    ]
    assert batch_id in await cli(stack, "list")
    rows = list(csv.DictReader(io.StringIO(await cli(stack, "report", batch_id, "--csv"))))
    assert len(rows) == 3
    by_state = Counter(r["state"] for r in rows)
    assert by_state == {"PAID": 2, "FAILED": 1}
    failed = next(r for r in rows if r["state"] == "FAILED")
    assert failed["receiver"] == "gone@example.com"
    assert failed["failure_reason"] == "RECEIVER_ACCOUNT_LOCKED"
    assert stack.wallet.balance(creators[1]) == 10_000
    paid = next(r for r in rows if r["state"] == "PAID")
    assert (paid["diamonds"], paid["amount"], paid["currency"]) == ("10000", "50.00", "USD")
    assert paid["provider_item_id"]
    assert paid["provider_transaction_id"]
    assert paid["sender_item_id"] == f"{paid['cashout_id']}-1"
    assert (paid["requested_by"], paid["request_id"]) == ("app-backend", f"r-{paid['creator_account_id']}")

    # The receiver fixed their account: `retry` puts the failed item into a second attempt
    # under a new hold, and the worker pays it.
    stack.paypal.faults(final_delay_seconds=0, receiver_outcomes={"gone@example.com": "SUCCESS"})
    retried = await cli(stack, "retry", batch_id, "--request-id", "cli-retry-1")
    assert retried.splitlines() == [
        "1 failed items put into a new attempt",
        f"batch {batch_id}  SUBMITTED  3 items  30000 diamonds  150.00 USD",
        "  BATCHED           1 items  50.00 USD",
        "  PAID              2 items  100.00 USD",
        created_by,
    ]
    status = await cli(stack, "status", batch_id, "--interval", "0.3")
    assert status.splitlines() == [
        f"batch {batch_id}  COMPLETED  3 items  30000 diamonds  150.00 USD",
        "  PAID              3 items  150.00 USD",
        created_by,
    ]
    rows = list(csv.DictReader(io.StringIO(await cli(stack, "report", batch_id, "--csv"))))
    again = next(r for r in rows if r["cashout_id"] == failed["cashout_id"])
    assert (again["state"], again["attempt"], again["failure_reason"]) == ("PAID", "2", "")
    assert again["sender_item_id"] == f"{failed['cashout_id']}-2"
    # Released under one request id (two polls of a loaded machine may both send it: a replay).
    assert set(stack.wallet.request_ids(RELEASE, failed["cashout_id"])) == {f"release:{failed['cashout_id']}"}
    committed_once(stack.wallet, [f"{failed['cashout_id']}.2"])
    assert all(stack.wallet.balance(c) == 0 for c in creators)
    assert len(paid_once(stack.paypal, [])) == 4


async def test_ops_cli_status_gives_up_at_its_timeout(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    await stack.creators(2)
    # No worker runs: the batch cannot complete.
    batch_id = (await cli(stack, "create-batch", "--request-id", "cli-stuck")).split()[1]
    out = await cli(stack, "status", batch_id, "--interval", "0.2", "--timeout", "1", status=STILL_RUNNING)
    assert out.splitlines()[0] == f"batch {batch_id}  CREATED  2 items  20000 diamonds  100.00 USD"


async def test_daily_batch_is_created_once_per_day(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    creators = await stack.creators(2)
    stack.worker()
    app = stack.celery()
    runs = await stack.results([stack.send(app, "payouts.daily_batch") for _ in range(3)])
    # All three ran; each answered with the same batch (the day's request id replays).
    (batch_id,) = set(runs.values())
    assert batch_id.startswith("pb_")

    async def batches() -> list[str]:
        reply = await stack.stub.ListPayoutBatches(pb.ListPayoutBatchesRequest(), metadata=stack.ops())
        return [b.batch_id for b in reply.batches]

    assert await batches() == [batch_id]
    await stack.completed(batch_id)
    items = await stack.items(batch_id)
    assert len(paid_once(stack.paypal, items)) == 2
    # Each replayed daily run queues the batch's plan again, so its steps may run twice.
    committed_once(stack.wallet, [c.cashout_id for c in items], replays=True)
    # A cash-out requested after today's batch waits for tomorrow's: the day's batch
    # request id replays, it does not open a second batch that would take it.
    stack.wallet.credit(creators[0], 10_000)
    late = await stack.stub.RequestCashout(
        pb.RequestCashoutRequest(request_id="r-late", creator_account_id=creators[0], diamonds=10_000),
        metadata=stack.app(),
    )
    (again,) = (await stack.results([stack.send(app, "payouts.daily_batch")])).values()
    assert again == batch_id
    assert await batches() == [batch_id]
    cashout = await stack.stub.GetCashout(
        pb.GetCashoutRequest(cashout_id=late.cashout.cashout_id), metadata=stack.app()
    )
    assert cashout.cashout.state == pb.CASHOUT_STATE_REQUESTED
    assert cashout.cashout.batch_id == ""
    assert stack.wallet.holds[late.cashout.cashout_id].state == wpb.RESERVATION_STATE_HELD
