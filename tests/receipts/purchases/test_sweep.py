"""The outbox sweep (``Crediting.credit_uncredited``) through real sockets: a purchase
the app path recorded but never took to the wallet (stopped at the failpoint
``receipts.credit.before_wallet``) is credited by the sweep alone, as the app path
would have credited it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.failpoints import Action, FailpointError, Failpoints
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Claim, evidence_hash
from tests.receipts.purchases.test_crediting import purchase
from tests.receipts.support import WalletReceipts

BEFORE_WALLET = "receipts.credit.before_wallet"


def stop_before_wallet(crediting: Crediting, tmp_path: Path) -> Iterator[None]:
    """The app path records the purchase, then fails before the wallet hears of it."""
    crediting.failpoints = Failpoints({BEFORE_WALLET: Action("error")}, tmp_path / "failpoints")
    yield
    crediting.failpoints = Failpoints()


async def record_only(crediting: Crediting, tmp_path: Path, *args: object) -> None:
    for _ in stop_before_wallet(crediting, tmp_path):
        with pytest.raises(FailpointError):
            await crediting.credit(*args)  # type: ignore[arg-type]


async def credited_evidence(real: WalletReceipts, store_transaction_id: str) -> str:
    """The evidence hash the wallet keeps with the purchase's credit."""
    consumption = await real.wallet.stub.GetPurchaseConsumption(
        wpb.GetPurchaseConsumptionRequest(
            store=wpb.STORE_APP_STORE,
            environment=wpb.STORE_ENVIRONMENT_PRODUCTION,
            store_transaction_id=store_transaction_id,
        ),
        metadata=real.wallet.md(),
        timeout=10,
    )
    return consumption.evidence_sha256


async def test_sweep_credits_with_the_recorded_evidence(real: WalletReceipts, tmp_path: Path) -> None:
    crediting = real.components.crediting
    evidence = evidence_hash("header.payload-of-s-1.signature")
    await record_only(crediting, tmp_path, purchase("s-1", evidence_sha256=evidence), Claim("fan-1", "r-1"))
    assert await real.ledger("fan-1") == []

    assert await crediting.credit_uncredited(timedelta(0)) == 1

    assert await real.ledger("fan-1") == [("s-1", 350)]
    assert await credited_evidence(real, "s-1") == evidence


async def test_a_notification_recorded_row_takes_the_claimers_evidence(real: WalletReceipts, tmp_path: Path) -> None:
    crediting = real.components.crediting
    evidence = evidence_hash("header.payload-of-s-2.signature")
    await crediting.record(purchase("s-2"))
    await record_only(crediting, tmp_path, purchase("s-2", evidence_sha256=evidence), Claim("fan-2", "r-1"))

    assert await crediting.credit_uncredited(timedelta(0)) == 1

    assert await credited_evidence(real, "s-2") == evidence
