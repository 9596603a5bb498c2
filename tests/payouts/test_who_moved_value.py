"""Who moved value across services: a gift and a cash-out, each by a caller with its own
key, show the caller, whom it acted for and the request id in the wallet's history and
in the payouts RPCs (real wallet, real payouts service, key policy with distinct keys)."""

from __future__ import annotations

from pathlib import Path

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.auth import TokenVerifier, load_key_policy
from tests.payouts.conftest import start_service
from tests.payouts.harness import PayPalSimServer, payouts_settings, write_catalog
from tests.support.tokens import Grant, make_keys, write_key_policy
from tests.wallet.support import credit_request, running_wallet


def mover(actor: object) -> tuple[str, str, str, str]:
    return actor.subject, actor.key_id, actor.acting_for, actor.request_id  # type: ignore[attr-defined]


async def test_gift_and_cashout_name_their_callers(tmp_path: Path, database_url: str, paypal: PayPalSimServer) -> None:
    keys = {name: make_keys(tmp_path / name, f"{name}-1") for name in ("app", "receipts", "payouts", "ops")}
    policy = write_key_policy(
        tmp_path / "policy.toml",
        [
            Grant(keys["app"], ("app-backend",), ("wallet:read", "wallet:gift", "payouts:request"), may_act=True),
            Grant(keys["receipts"], ("receipts",), ("wallet:credit",)),
            Grant(keys["payouts"], ("payouts",), ("wallet:read", "wallet:reserve")),
            Grant(keys["ops"], ("ops-ann",), ("payouts:ops",), may_act=False),
        ],
    )
    app = keys["app"]
    verifier = TokenVerifier(load_key_policy(policy))
    async with running_wallet(database_url, keys["receipts"], tmp_path, verifier=verifier) as wallet:
        settings = payouts_settings(
            database_url=database_url,
            broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            catalog=write_catalog(tmp_path),
            keys=keys["payouts"],
            wallet_address=wallet.address,
            paypal_url=paypal.api_url,
            auth_key_policy=policy,
            auth_signing_key_id="payouts-1",
        )
        host, database, channel = await start_service(settings)
        try:
            payouts = pb_grpc.PayoutServiceStub(channel)
            await wallet.stub.CreditPurchase(
                credit_request("fan", 20_000, request_id="credit-fan"),
                metadata=keys["receipts"].metadata("wallet:credit", subject="receipts"),
            )
            await wallet.stub.SendGift(
                wpb.SendGiftRequest(
                    request_id="gift-fan",
                    sender_account_id="fan",
                    creator_account_id="star",
                    gift_id="rose",
                    count=20_000,
                ),
                metadata=app.metadata("wallet:gift", subject="app-backend", act="fan"),
            )
            as_star = app.metadata("payouts:request", subject="app-backend", act="star")
            await payouts.SetPayoutDestination(
                pb.SetPayoutDestinationRequest(
                    request_id="dest-star",
                    creator_account_id="star",
                    destination=pb.PayoutDestination(provider=pb.PROVIDER_PAYPAL, receiver="star@example.com"),
                ),
                metadata=as_star,
            )
            ops = keys["ops"].metadata("payouts:ops", subject="ops-ann")
            await payouts.VerifyPayoutDestination(
                pb.VerifyPayoutDestinationRequest(
                    request_id="verify-star",
                    creator_account_id="star",
                    provider=pb.PROVIDER_PAYPAL,
                    receiver="star@example.com",
                ),
                metadata=ops,
            )
            cashout = (
                await payouts.RequestCashout(
                    pb.RequestCashoutRequest(request_id="cash-star", creator_account_id="star", diamonds=10_000),
                    metadata=as_star,
                )
            ).cashout
            assert mover(cashout.requested_by) == ("app-backend", "app-1", "star", "cash-star")
            batch = (
                await payouts.CreatePayoutBatch(pb.CreatePayoutBatchRequest(request_id="batch-1"), metadata=ops)
            ).batch
            assert mover(batch.created_by) == ("ops-ann", "ops-1", "", "batch-1")
            items = await payouts.ListBatchItems(pb.ListBatchItemsRequest(batch_id=batch.batch_id), metadata=ops)
            assert [mover(c.requested_by) for c in items.cashouts] == [("app-backend", "app-1", "star", "cash-star")]
            seen = await payouts.GetPayoutDestination(
                pb.GetPayoutDestinationRequest(creator_account_id="star"), metadata=ops
            )
            assert mover(seen.destination.changed_by) == ("app-backend", "app-1", "star", "dest-star")
            assert mover(seen.destination.verified_by) == ("ops-ann", "ops-1", "", "verify-star")

            star = await wallet.stub.ListTransactions(
                wpb.ListTransactionsRequest(account_id="star"),
                metadata=app.metadata("wallet:read", subject="app-backend"),
            )
            # The hold was made by the payouts service with its own key, under the cash-out's reservation.
            assert [(t.kind, mover(t.moved_by)) for t in star.transactions] == [
                (wpb.TRANSACTION_KIND_RESERVATION, ("payouts", "payouts-1", "", f"reserve:{cashout.cashout_id}")),
                (wpb.TRANSACTION_KIND_GIFT_RECEIVED, ("app-backend", "app-1", "fan", "gift-fan")),
            ]
        finally:
            await channel.close(None)
            await host.stop()  # type: ignore[attr-defined]
            database.close()
