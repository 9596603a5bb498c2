"""A refund that reaches us before its purchase is kept against the purchase key:
the purchase, reported afterwards by the app, by a notification or while a credit
is in flight, is recorded REVOKED (refunded before it was credited) and never
credited; a revocation seen while verifying a credited purchase reverses it. What
moved is read from the real wallet's ledger (PostgreSQL in CI)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from services.common.catalog import StoreId
from services.common.db import Database
from services.receipts.apple.rules import ApplePolicy, check_transaction
from services.receipts.purchases.model import Claim, Outcome, StoredState
from services.storesim import apple as apple_sim
from services.storesim.apple import AppleStore
from tests.receipts.notifications.apple_payloads import transaction
from tests.receipts.notifications.conftest import Core
from tests.receipts.notifications.test_handle import APPLE_PACK, GOOGLE_PACK, Harness, bind
from tests.receipts.notifications.test_webhooks import rtdn


@pytest.fixture
def signer(core: Core) -> AppleStore:
    """The App Store whose chain the core trusts (its settings' root)."""
    return apple_sim.create_store(core.settings.apple_root_certs[0].parent.parent)


@pytest.fixture
def trusted(receipts_db: Database, signer: AppleStore, core: Core) -> Iterator[Harness]:
    harness = Harness(receipts_db, signer, core)
    yield harness
    harness.loop.close()


def state_of(core: Core, store: StoreId, key: str) -> StoredState | None:
    record = core.loop.run(core.components.purchases.get(store, key))
    return None if record is None else record.state


def test_apple_refund_first_then_the_app_and_a_notification_report_the_purchase(
    trusted: Harness, core: Core, signer: AppleStore
) -> None:
    token, _ = bind(trusted, "fan-a")
    txid = str(3_100_000_000 + uuid.uuid4().int % 1_000_000)
    tx = transaction(txid, product_id=APPLE_PACK, app_account_token=token)
    refunded = {**tx, "revocationDate": tx["purchaseDate"], "revocationReason": 0, "revocationType": "REFUND_FULL"}
    # The purchase's notification is late; its refund arrives first.
    assert trusted.process(trusted.store_apple("REFUND", refunded)) == "already_reversed"
    # The app reports the transaction it got at purchase time (not revoked in its own JWS).
    apple = core.components.apple
    results = core.loop.run(apple.verify(Claim("fan-a", "r-app"), signed_transaction=signer.sign(tx)))
    assert [r.outcome for r in results] == [Outcome.REVOKED]
    # The late purchase notification credits nothing either.
    assert trusted.process(trusted.store_apple("ONE_TIME_CHARGE", tx)) == "revoked"
    assert core.ledger("fan-a") == []
    assert state_of(core, StoreId.APP_STORE, txid) is StoredState.REVOKED


def test_an_unclaimed_recorded_purchase_refunded_in_full_shows_revoked(trusted: Harness, core: Core) -> None:
    tx = transaction("3200000001", product_id=APPLE_PACK, app_account_token=str(uuid.uuid4()))
    assert trusted.process(trusted.store_apple("ONE_TIME_CHARGE", tx)) == "recorded"
    assert trusted.process(trusted.store_apple("REFUND", tx)) == "already_reversed"
    assert state_of(core, StoreId.APP_STORE, "3200000001") is StoredState.REVOKED
    # The first account to claim it gets the refund's answer, not coins.
    bind(trusted, "fan-late")
    crediting = core.components.crediting
    purchase = check_transaction(tx, ApplePolicy("com.coinstore.app"), "signed_transaction")
    result = core.loop.run(crediting.credit(purchase, Claim("fan-late", "r-late")))
    assert result.outcome is Outcome.REVOKED
    assert core.ledger("fan-late") == []


def test_play_refund_first_then_the_app_and_a_notification_report_the_purchase(trusted: Harness, core: Core) -> None:
    _, obfuscated = bind(trusted, "fan-g")
    token = core.play.buy(GOOGLE_PACK, account_id=obfuscated).token
    core.play.refund(token)
    trusted.process(trusted.store_google(rtdn("voidedPurchaseNotification", token)))
    google = core.components.google
    result = core.loop.run(google.verify(Claim("fan-g", "r-g"), GOOGLE_PACK, token, "", None))
    assert result.outcome is Outcome.REVOKED
    bought = rtdn("oneTimeProductNotification", token, sku=GOOGLE_PACK)
    assert trusted.process(trusted.store_google(bought)) == "revoked"
    assert core.ledger("fan-g") == []
    assert state_of(core, StoreId.GOOGLE_PLAY, token) is StoredState.REVOKED


def test_a_revocation_seen_while_verifying_reverses_a_credited_purchase(
    trusted: Harness, core: Core, signer: AppleStore
) -> None:
    token, _ = bind(trusted, "fan-v")
    tx = transaction("3200000002", product_id=APPLE_PACK, app_account_token=token)
    assert trusted.process(trusted.store_apple("ONE_TIME_CHARGE", tx)) == "credited"
    # The REFUND notification is lost; the app verifies again and Apple's JWS now says revoked.
    revoked = {**tx, "revocationDate": tx["purchaseDate"], "revocationReason": 1, "revocationType": "REFUND_FULL"}
    apple = core.components.apple
    results = core.loop.run(apple.verify(Claim("fan-v", "r-again"), signed_transaction=signer.sign(revoked)))
    assert [r.outcome for r in results] == [Outcome.REFUNDED]
    assert core.ledger("fan-v") == [("3200000002", 350), ("3200000002", -350)]
    # Reported again: nothing more moves.
    core.loop.run(apple.verify(Claim("fan-v", "r-third"), signed_transaction=signer.sign(revoked)))
    assert core.ledger("fan-v") == [("3200000002", 350), ("3200000002", -350)]
    assert state_of(core, StoreId.APP_STORE, "3200000002") is StoredState.REFUNDED


class RefundDuringCredit:
    """Records a store refund in the database at the instant the wallet has credited
    and the purchase row does not say so yet (the failpoint ``after_wallet``)."""

    def __init__(self, database: Database, txid: str) -> None:
        self.database = database
        self.txid = txid

    def hit(self, name: str) -> None:
        if name != "receipts.credit.after_wallet":
            return
        refunds = self.database.table("receipts_refunds")
        now = datetime.now(UTC)
        row: dict[str, Any] = {
            "store": StoreId.APP_STORE.value,
            "store_transaction_id": self.txid,
            "environment": None,
            "full_refund": True,
            "reason": "apple REFUND",
            "reported_at": now,
            "updated_at": now,
        }
        self.database.transaction(lambda conn: conn.execute(sa.insert(refunds).values(**row)))


def test_a_refund_recorded_while_the_credit_is_in_flight_is_reversed(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    crediting = core.components.crediting
    monkeypatch.setattr(crediting, "failpoints", RefundDuringCredit(core.components.database, "3200000003"))
    tx = transaction("3200000003", product_id=APPLE_PACK)
    purchase = check_transaction(tx, ApplePolicy("com.coinstore.app"), "signed_transaction")
    result = core.loop.run(crediting.credit(purchase, Claim("fan-r", "r-race")))
    # apply_refund found no credit in the wallet yet; the credit path read the refund after crediting.
    assert result.outcome is Outcome.REFUNDED
    assert core.ledger("fan-r") == [("3200000003", 350), ("3200000003", -350)]
