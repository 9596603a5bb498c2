"""Domain values → protobuf messages of coinstore.payouts.v1."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.type.v1 import money_pb2
from services.payouts.domain.model import (
    Batch,
    BatchState,
    Cashout,
    CashoutState,
    Destination,
    DestinationChange,
    DestinationChangeKind,
)

PROVIDERS: dict[int, str] = {pb.PROVIDER_PAYPAL: "paypal"}
PROVIDER_ENUMS: dict[str, pb.Provider.ValueType] = {"paypal": pb.PROVIDER_PAYPAL}

CASHOUT_STATES = {
    CashoutState.REQUESTED: pb.CASHOUT_STATE_REQUESTED,
    CashoutState.BATCHED: pb.CASHOUT_STATE_BATCHED,
    CashoutState.SUBMITTED: pb.CASHOUT_STATE_SUBMITTED,
    CashoutState.PAID: pb.CASHOUT_STATE_PAID,
    CashoutState.FAILED: pb.CASHOUT_STATE_FAILED,
    CashoutState.CANCELLED: pb.CASHOUT_STATE_CANCELLED,
    CashoutState.RESERVING: pb.CASHOUT_STATE_RESERVING,
    CashoutState.EXPIRED: pb.CASHOUT_STATE_EXPIRED,
}
CHANGE_KINDS = {
    DestinationChangeKind.SET: pb.DESTINATION_CHANGE_KIND_SET,
    DestinationChangeKind.VERIFY: pb.DESTINATION_CHANGE_KIND_VERIFY,
}
BATCH_STATES = {
    BatchState.CREATED: pb.BATCH_STATE_CREATED,
    BatchState.SUBMITTED: pb.BATCH_STATE_SUBMITTED,
    BatchState.COMPLETED: pb.BATCH_STATE_COMPLETED,
    BatchState.CANCELLED: pb.BATCH_STATE_CANCELLED,
}


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(moment)
    return value


def money(amount_minor: int, currency: str) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount_minor, currency_code=currency)


def destination(value: Destination) -> pb.PayoutDestination:
    return pb.PayoutDestination(
        provider=PROVIDER_ENUMS.get(value.provider, pb.PROVIDER_UNSPECIFIED),
        receiver=value.receiver,
        verified=value.verified,
        changed_by=value.changed_by.message(),
        verified_by=value.verified_by.message(),
        update_time=timestamp(value.updated_at),
    )


def destination_change(value: DestinationChange) -> pb.DestinationChange:
    return pb.DestinationChange(
        kind=CHANGE_KINDS[value.kind],
        provider=PROVIDER_ENUMS.get(value.provider, pb.PROVIDER_UNSPECIFIED),
        receiver=value.receiver,
        changed_by=value.changed_by.message(),
        change_time=timestamp(value.created_at),
    )


def cashout(value: Cashout) -> pb.Cashout:
    return pb.Cashout(
        cashout_id=value.cashout_id,
        creator_account_id=value.creator_account_id,
        diamonds=value.diamonds,
        amount=money(value.amount_minor, value.currency),
        destination=pb.PayoutDestination(
            provider=PROVIDER_ENUMS.get(value.provider, pb.PROVIDER_UNSPECIFIED), receiver=value.receiver, verified=True
        ),
        state=CASHOUT_STATES[value.state],
        batch_id=value.batch_id,
        failure_reason=value.failure_reason,
        provider_item_id=value.provider_item_id,
        create_time=timestamp(value.created_at),
        update_time=timestamp(value.updated_at),
        rate=value.rate,
        provider_batch_id=value.provider_batch_id,
        provider_transaction_id=value.provider_transaction_id,
        attempt=value.attempt,
        sender_batch_id=value.chunk_id,
        sender_item_id=value.sender_item_id,
        requested_by=value.requested_by.message(),
    )


def batch(value: Batch) -> pb.PayoutBatch:
    return pb.PayoutBatch(
        batch_id=value.batch_id,
        state=BATCH_STATES[value.state],
        currency_code=value.currency,
        item_count=value.item_count,
        diamonds=value.diamonds,
        amount=money(value.amount_minor, value.currency),
        totals=[
            pb.ItemStateTotal(
                state=CASHOUT_STATES[t.state],
                count=t.count,
                diamonds=t.diamonds,
                amount=money(t.amount_minor, value.currency),
            )
            for t in value.totals
        ],
        cutoff_time=timestamp(value.cutoff_time),
        create_time=timestamp(value.created_at),
        submit_time=timestamp(value.submitted_at),
        complete_time=timestamp(value.completed_at),
        provider_batch_id=value.provider_batch_id,
        created_by=value.created_by.message(),
    )
