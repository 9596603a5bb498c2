"""The outbox sweep (``Crediting.credit_uncredited``) through real sockets: a purchase
the app path recorded but never took to the wallet (stopped at the failpoint
``receipts.credit.before_wallet``) is credited by the sweep alone, as the app path
would have credited it; one the wallet refuses for good is marked refused and left
alone; one the wallet could not answer is retried."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common import errors
from services.common.catalog import StoreId
from services.common.failpoints import Action, FailpointError, Failpoints
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Claim, CreditTerms, Refund, evidence_hash
from services.receipts.purchases.wallet import Credit
from tests.receipts.purchases.test_crediting import purchase
from tests.receipts.support import Receipts, WalletReceipts

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


def swept(components: Receipts | WalletReceipts, outcome: str) -> float:
    value = components.components.metrics.registry.get_sample_value(
        "coinstore_receipts_credit_sweep_total", {"outcome": outcome}
    )
    return value or 0.0


async def state_of(service: Receipts | WalletReceipts, store_transaction_id: str) -> pb.PurchaseResult:
    reply = await service.stub.GetPurchase(
        pb.GetPurchaseRequest(store=pb.STORE_APP_STORE, store_transaction_id=store_transaction_id),
        metadata=service.md(),
        timeout=10,
    )
    return reply.purchase


async def test_a_row_the_wallet_refuses_is_marked_refused_and_not_swept_again(
    real: WalletReceipts, tmp_path: Path
) -> None:
    crediting = real.components.crediting
    # The wallet already credited this store transaction to another account.
    await crediting.wallet.credit(CreditTerms(purchase("s-3"), 350, 0, False), "fan-1", "elsewhere")
    await record_only(crediting, tmp_path, purchase("s-3"), Claim("fan-2", "r-1"))

    assert await crediting.credit_uncredited(timedelta(0)) == 0

    found = await state_of(real, "s-3")
    assert found.state == pb.PURCHASE_STATE_REFUSED
    assert found.credit_refused_reason == "RECEIPT_BOUND_TO_OTHER_ACCOUNT"
    assert found.coins_credited == 0
    assert swept(real, "refused") == 1
    # The next sweep finds nothing to do: the row is not retried, logged or counted again.
    assert await crediting.credit_uncredited(timedelta(0)) == 0
    assert swept(real, "refused") == 1
    assert swept(real, "retry") == 0
    assert await real.ledger("fan-2") == []


async def test_a_row_the_wallet_could_not_answer_is_retried(receipts: Receipts, tmp_path: Path) -> None:
    crediting = receipts.components.crediting
    await record_only(crediting, tmp_path, purchase("s-4"), Claim("fan-1", "r-1"))
    receipts.wallet.down = True

    assert await crediting.credit_uncredited(timedelta(0)) == 0

    assert (await state_of(receipts, "s-4")).state == pb.PURCHASE_STATE_RECORDED
    assert (swept(receipts, "retry"), swept(receipts, "refused")) == (1, 0)
    receipts.wallet.down = False
    assert await crediting.credit_uncredited(timedelta(0)) == 1
    assert (await state_of(receipts, "s-4")).state == pb.PURCHASE_STATE_CREDITED
    assert receipts.wallet.only_credit("s-4").account_id == "fan-1"


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        (errors.FailedPrecondition("ACCOUNT_CLOSED", "closed"), "ACCOUNT_CLOSED"),
        (errors.NotFound("ACCOUNT_NOT_FOUND", "no such account"), "ACCOUNT_NOT_FOUND"),
        (errors.InvalidArgument("storefront", "not a storefront", "INVALID_STOREFRONT"), "INVALID_STOREFRONT"),
        (errors.Aborted("CONFLICT", "try again"), None),
        (errors.PermissionDenied("KEY_SCOPE_NOT_ALLOWED", "the key may not"), None),
        (errors.ResourceExhausted("TOO_MANY_REQUESTS", "slow down"), None),
    ],
)
async def test_which_wallet_answers_refuse_for_good(
    receipts: Receipts, tmp_path: Path, answer: errors.DomainError, refused: str | None
) -> None:
    crediting = receipts.components.crediting
    await record_only(crediting, tmp_path, purchase("s-5"), Claim("fan-1", "r-1"))
    receipts.wallet.refuse = answer

    assert await crediting.credit_uncredited(timedelta(0)) == 0

    found = await state_of(receipts, "s-5")
    if refused is None:
        assert (found.state, swept(receipts, "retry")) == (pb.PURCHASE_STATE_RECORDED, 1)
    else:
        assert (found.state, found.credit_refused_reason) == (pb.PURCHASE_STATE_REFUSED, refused)
        assert swept(receipts, "refused") == 1
    # Verifying it again asks the wallet again; once it credits, the row says so.
    receipts.wallet.refuse = None
    assert (await crediting.credit(purchase("s-5"), Claim("fan-1", "r-2"))).coins_credited == 350
    found = await state_of(receipts, "s-5")
    assert (found.state, found.credit_refused_reason) == (pb.PURCHASE_STATE_CREDITED, "")


async def test_a_refused_row_refunded_in_full_is_revoked(receipts: Receipts, tmp_path: Path) -> None:
    crediting = receipts.components.crediting
    await record_only(crediting, tmp_path, purchase("s-6"), Claim("fan-1", "r-1"))
    receipts.wallet.refuse = errors.FailedPrecondition("ACCOUNT_CLOSED", "closed")
    await crediting.credit_uncredited(timedelta(0))
    assert (await state_of(receipts, "s-6")).state == pb.PURCHASE_STATE_REFUSED

    await crediting.apply_refund(Refund(StoreId.APP_STORE, "s-6", None, full=True), request_id="refund-1")

    assert (await state_of(receipts, "s-6")).state == pb.PURCHASE_STATE_REVOKED


async def test_a_long_backlog_is_swept_in_waves(
    receipts: Receipts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crediting = receipts.components.crediting
    for n in range(5):
        await record_only(crediting, tmp_path / str(n), purchase(f"w-{n}"), Claim("fan-1", f"r-{n}"))
    credit = crediting.wallet.credit
    in_flight: list[int] = [0, 0]  # now, most

    async def counted(*args: Any) -> Credit:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            await asyncio.sleep(0.01)
            return await credit(*args)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(crediting.wallet, "credit", counted)
    crediting.sweep_wave = 2

    assert await crediting.credit_uncredited(timedelta(0)) == 5

    assert in_flight == [0, 2]
    assert sorted(c.store_transaction_id for c in receipts.wallet.credits) == [f"w-{n}" for n in range(5)]
