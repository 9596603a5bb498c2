"""Conversions between the receipts domain and the receipts proto."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.type.v1 import money_pb2
from services.common.catalog import CoinPack, Price, Promotion, StoreId
from services.receipts.purchases.model import Environment, Outcome, PurchaseRecord, PurchaseResult, StoredState

STORE_TO_PB = {StoreId.APP_STORE: pb.STORE_APP_STORE, StoreId.GOOGLE_PLAY: pb.STORE_GOOGLE_PLAY}
STORE_FROM_PB: Mapping[int, StoreId] = {v: k for k, v in STORE_TO_PB.items()}
ENVIRONMENT_TO_PB = {
    Environment.PRODUCTION: pb.STORE_ENVIRONMENT_PRODUCTION,
    Environment.SANDBOX: pb.STORE_ENVIRONMENT_SANDBOX,
}
OUTCOME_TO_PB = {
    Outcome.CREDITED: pb.PURCHASE_STATE_CREDITED,
    Outcome.ALREADY_CREDITED: pb.PURCHASE_STATE_ALREADY_CREDITED,
    Outcome.REVOKED: pb.PURCHASE_STATE_REVOKED,
    Outcome.PENDING: pb.PURCHASE_STATE_PENDING,
    Outcome.REFUNDED: pb.PURCHASE_STATE_REFUNDED,
    Outcome.RECORDED: pb.PURCHASE_STATE_RECORDED,
}
STORED_TO_PB = {
    StoredState.RECORDED: pb.PURCHASE_STATE_RECORDED,
    StoredState.CREDITED: pb.PURCHASE_STATE_CREDITED,
    StoredState.REVOKED: pb.PURCHASE_STATE_REVOKED,
    StoredState.PENDING: pb.PURCHASE_STATE_PENDING,
    StoredState.REFUNDED: pb.PURCHASE_STATE_REFUNDED,
    StoredState.REFUSED: pb.PURCHASE_STATE_REFUSED,
}


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def money(price: Price | None) -> money_pb2.Money | None:
    if price is None:
        return None
    return money_pb2.Money(amount_minor=price.amount_minor, currency_code=price.currency)


def record_pb(record: PurchaseRecord, state: pb.PurchaseState.ValueType | None = None) -> pb.PurchaseResult:
    """A stored purchase as a PurchaseResult (GetPurchase)."""
    credited = record.state in (StoredState.CREDITED, StoredState.REFUNDED)
    return pb.PurchaseResult(
        state=state if state is not None else STORED_TO_PB[record.state],
        store=STORE_TO_PB[record.store],
        store_transaction_id=record.store_transaction_id,
        product_id=record.product_id,
        quantity=record.quantity,
        coins_credited=record.coins + record.bonus_coins if credited else 0,
        bonus_coins=record.bonus_coins if credited else 0,
        environment=ENVIRONMENT_TO_PB[record.environment],
        storefront=record.storefront,
        account_id=record.account_id or "",
        flagged_for_review=record.flagged_for_review,
        purchase_time=timestamp(record.purchase_time),
        price=money(record.price),
        order_id=record.order_id,
        credit_refused_reason=record.credit_refused_reason,
    )


def result_pb(result: PurchaseResult) -> pb.PurchaseResult:
    """The answer of a verification call for one store transaction."""
    message = record_pb(result.record, OUTCOME_TO_PB[result.outcome])
    message.coins_credited = result.coins_credited
    message.bonus_coins = result.bonus_coins
    message.new_balance = result.new_balance
    return message


def product_pb(pack: CoinPack, promotion: Promotion | None) -> pb.Product:
    return pb.Product(
        product_id=pack.product_id,
        store=STORE_TO_PB[pack.store],
        coins=pack.coins,
        bonus_coins=promotion.bonus_coins if promotion else 0,
        price=money(pack.price),
        promotion_id=promotion.promotion_id if promotion else "",
    )
