"""The lock order holds under real concurrency on PostgreSQL: refunds, restores, gift
batches, spends and cash-out holds on the same accounts at once never deadlock (the
database would detect it and the store would retry silently, so the test reads the
retry log), never fail, and leave a clean audit; the single-statement locks take their
rows in the lock order."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import sqlalchemy as sa

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.common.catalog import load_catalog
from services.wallet.audit import audit
from services.wallet.store import WalletStore
from tests.support.databases import postgres_database
from tests.support.status import error_info
from tests.support.tokens import Keys
from tests.support.waiting import eventually
from tests.wallet.support import Wallet, running_wallet, unique, write_catalog
from tests.wallet.test_holds import earn, lapse, paid, settle, soon
from tests.wallet.test_purchases_reservations import reserve

T = TypeVar("T")

# Refusals the state may legitimately produce while everything races.
ROUNDS = 20
EXPECTED = {
    "INSUFFICIENT_COINS",
    "ACCOUNT_RESTRICTED",
    "INSUFFICIENT_DIAMONDS",
    "DIAMONDS_NOT_MATURE",
    "DIAMOND_DEBT",
    "RESERVATION_ALREADY_COMMITTED",
}


async def attempt(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return str(error_info(error).reason)
    return "OK"


@pytest.mark.slow
async def test_refunds_and_gift_batches_on_the_same_accounts_never_deadlock(
    postgres_url: str, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fans = [f"fan-{i}" for i in range(12)]
    stars = [f"star-{i}" for i in range(4)]
    rng = random.Random(7)
    async with running_wallet(postgres_url, keys, tmp_path, db_pool_size=16) as wallet:
        for fan in fans:
            for n in range(3):
                await wallet.credit(fan, 300, stx=f"{fan}-{n}")
        # Stars are fans too, so their coin rows and diamond rows are locked from both sides.
        for star in stars:
            await wallet.credit(star, 100, stx=f"{star}-0")
        md = wallet.md()

        def refund(account: str, n: int, full: bool) -> object:
            return wallet.stub.ReversePurchase(
                pb.ReversePurchaseRequest(
                    request_id=unique("rv"),
                    store=pb.STORE_APP_STORE,
                    environment=pb.STORE_ENVIRONMENT_PRODUCTION,
                    store_transaction_id=f"{account}-{n}",
                    full_refund=full,
                    refunded_percentage_milli=0 if full else 50_000,
                ),
                metadata=md,
            )

        def restore(account: str, n: int) -> object:
            return wallet.stub.RestorePurchase(
                pb.RestorePurchaseRequest(
                    request_id=unique("rs"),
                    store=pb.STORE_APP_STORE,
                    environment=pb.STORE_ENVIRONMENT_PRODUCTION,
                    store_transaction_id=f"{account}-{n}",
                ),
                metadata=md,
            )

        def hold(star: str, n: int) -> object:
            return wallet.stub.ReserveDiamonds(
                pb.ReserveDiamondsRequest(
                    request_id=unique("rsv"), account_id=star, diamonds=5, reservation_id=f"{star}-hold-{n}"
                ),
                metadata=md,
            )

        calls: list[object] = []
        for round_ in range(ROUNDS):
            for fan in fans:
                calls.append(wallet.gift(fan, rng.choice(stars), "panda"))
                calls.append(wallet.gift(fan, rng.choice([a for a in stars + fans if a != fan]), "rose", count=3))
            for star in stars:
                calls.append(wallet.gift(star, rng.choice([a for a in stars[:2] + fans[:2] if a != star]), "rose"))
                calls.append(hold(star, round_))
            for fan in rng.sample(fans, 4):
                calls.append(refund(fan, rng.randrange(3), full=rng.random() < 0.5))
            for fan in rng.sample(fans, 2):
                calls.append(restore(fan, rng.randrange(3)))
            calls.append(
                wallet.stub.SpendCoins(
                    pb.SpendCoinsRequest(
                        request_id=unique("sp"), account_id=rng.choice(fans), purpose="PROMOTE", coins=7
                    ),
                    metadata=md,
                )
            )
        rng.shuffle(calls)
        with caplog.at_level(logging.DEBUG, logger="services.common.db"):
            outcomes = await asyncio.gather(*(attempt(c) for c in calls))
        retried = [r.getMessage() for r in caplog.records if r.name == "services.common.db"]
        assert not [m for m in retried if "Deadlock" in m], retried
        assert set(outcomes) - {"OK"} <= EXPECTED, sorted(set(outcomes))
        assert outcomes.count("OK") > len(calls) // 2
        assert audit(wallet.database) == []


async def _waiting_on_a_lock(wallet: Wallet, blocker_pid: int) -> bool:
    def check() -> bool:
        with wallet.database.engine.connect() as conn:
            waiting = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> :pid"
                ),
                {"pid": blocker_pid},
            ).scalar_one()
        return bool(waiting)

    return await asyncio.to_thread(check)


async def _probe_while_blocked(wallet: Wallet, blocking: str, work: Awaitable[T], probe: str, *, locked: bool) -> T:
    """Run ``work`` while another transaction holds the row ``blocking`` locks. Once ``work``
    waits for it, the ``… FOR UPDATE NOWAIT`` of ``probe`` must find its row locked by
    ``work`` (``locked``) or free. Then let ``work`` finish and return its result."""
    with wallet.database.engine.connect() as blocker:
        blocker_pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        blocker.execute(sa.text(blocking))
        running = asyncio.ensure_future(work)
        await eventually(
            lambda: _waiting_on_a_lock(wallet, blocker_pid), "the work to wait on a lock", 10, interval=0.05
        )
        with wallet.database.engine.connect() as prober:
            if locked:
                with pytest.raises(sa.exc.OperationalError, match="could not obtain lock"):
                    prober.execute(sa.text(probe))
            else:
                prober.execute(sa.text(probe))
                prober.rollback()
        blocker.rollback()
    return await running


async def test_a_gift_batch_locks_the_senders_coin_rows_before_their_lots(
    postgres_url: str, keys: Keys, tmp_path: Path
) -> None:
    """Spendable rows are locked before open lots (the stated lock order, which the one
    statement that locks both must keep). A transaction holding the fan's lot makes the
    gift wait on it: by then the fan's coin row must be locked already (a NOWAIT lock of
    it fails)."""
    async with running_wallet(postgres_url, keys, tmp_path) as wallet:
        await wallet.credit("fan", 10, stx="fan-lot")
        reply = await _probe_while_blocked(
            wallet,
            "SELECT lot_id FROM wallet_purchases WHERE account_id = 'fan' FOR UPDATE",
            wallet.gift("fan", "star"),
            "SELECT balance FROM wallet_balances WHERE account_id = 'fan' AND currency = 'COIN' FOR UPDATE NOWAIT",
            locked=True,
        )
        assert reply.coins_spent == 1
        assert (await wallet.balance("fan")).coins == 9


async def test_a_paid_settle_locks_the_creators_other_holds_in_id_order_with_its_own(
    postgres_url: str, keys: Keys, tmp_path: Path
) -> None:
    """A commit paid beyond its hold may take the creator's other unsubmitted holds; it must
    lock them in id order together with its own (SubmitReservations locks only reservations,
    by id, so taking them after its own could deadlock). A transaction holding the lower-id
    other hold makes the settle wait on it: by then its own (higher-id) hold must still be
    free (a NOWAIT lock of it succeeds)."""
    async with running_wallet(postgres_url, keys, tmp_path) as wallet:
        await earn(wallet, "star", 100)
        await reserve(wallet, "star", 30, "a-other")
        await reserve(wallet, "star", 10, "z-paid")
        [result] = await _probe_while_blocked(
            wallet,
            "SELECT 1 FROM wallet_reservations WHERE reservation_id = 'a-other' FOR UPDATE",
            settle(wallet, paid("z-paid", 20)),
            "SELECT 1 FROM wallet_reservations WHERE reservation_id = 'z-paid' FOR UPDATE NOWAIT",
            locked=False,
        )
        assert result.error_reason == ""
        assert result.reservation.diamonds_shortfall == 10


@pytest.fixture
def icu_postgres_url() -> Iterator[str]:
    """A database that sorts text as ICU's en-US does, as many production databases do:
    "alice" before "Zed", where Python (and every lock order here) puts "Zed" first."""
    with postgres_database(icu_locale="en-US") as url:
        yield url


async def test_the_expiry_sweep_locks_owners_in_code_point_order_under_an_icu_collation(
    icu_postgres_url: str, keys: Keys, tmp_path: Path
) -> None:
    """The sweep locks each owner's diamond rows as it reaches the owner's expired holds, in
    the order every other path locks accounts in (Python's), whatever the database's
    collation. A transaction holding alice's diamond row makes the sweep wait on it: by then
    Zed's, first by code point though second under en-US, must be locked already."""
    async with running_wallet(icu_postgres_url, keys, tmp_path) as wallet:
        for star in ("alice", "Zed"):
            await earn(wallet, star, 10)
            await reserve(wallet, star, 5, f"{star}-hold", expire_time=soon())
        lapse(wallet)
        store = WalletStore(
            wallet.database, load_catalog(write_catalog(tmp_path)), wallet.clock, reservation_ttl=timedelta(days=7)
        )
        diamonds_of = "SELECT 1 FROM wallet_balances WHERE account_id = '{}' AND currency = 'DIAMOND' FOR UPDATE"
        expired = await _probe_while_blocked(
            wallet,
            diamonds_of.format("alice"),
            asyncio.to_thread(store.sweep_expired),
            diamonds_of.format("Zed") + " NOWAIT",
            locked=True,
        )
        assert expired == 2


async def test_a_clawback_locks_a_creators_holds_in_code_point_order_under_an_icu_collation(
    icu_postgres_url: str, keys: Keys, tmp_path: Path
) -> None:
    """A refund clawing diamonds back may take them from the creator's holds, which it locks
    in id order as Python sorts the ids (SubmitReservations and the settle lock them so),
    whatever the database's collation. A transaction holding "a-hold" makes the reversal wait
    on it: by then "Z-hold", first by code point though second under en-US, must be locked."""
    async with running_wallet(icu_postgres_url, keys, tmp_path) as wallet:
        stx = await earn(wallet, "star", 100)
        await reserve(wallet, "star", 40, "a-hold")
        await reserve(wallet, "star", 40, "Z-hold")
        hold = "SELECT 1 FROM wallet_reservations WHERE reservation_id = '{}' FOR UPDATE"
        reversal = wallet.stub.ReversePurchase(
            pb.ReversePurchaseRequest(
                request_id=unique("rv"),
                store=pb.STORE_APP_STORE,
                environment=pb.STORE_ENVIRONMENT_PRODUCTION,
                store_transaction_id=stx,
                full_refund=True,
            ),
            metadata=wallet.md(),
        )
        reply = await _probe_while_blocked(
            wallet, hold.format("a-hold"), reversal, hold.format("Z-hold") + " NOWAIT", locked=True
        )
        assert (reply.state, reply.coins_reversed) == (pb.REVERSAL_STATE_APPLIED, 100)
