"""Thin gRPC servicer of the wallet service: validate, call the store, map back."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.common.actor import Actor
from services.common.catalog import Catalog
from services.common.group_commit import Batching, GroupCommit
from services.common.validation import (
    optional_id,
    page_size,
    require_currency,
    require_enum,
    require_id,
    require_non_negative,
    require_positive,
    require_text,
)
from services.wallet.domain.ledger import BalanceView, Environment, Kind, Store
from services.wallet.domain.provenance import PERCENT_MILLI_FULL, Leg, LegKind
from services.wallet.domain.rules import Period, ReservationState
from services.wallet.errors import DomainError, InvalidArgument, NotFound
from services.wallet.store import (
    ConsumptionView,
    CreditItem,
    CreditResult,
    DebitDone,
    DebitItem,
    HistoryItem,
    LimitView,
    ReservationView,
    ReversalResult,
    ReversalState,
    SettleHold,
    SubmitHold,
    WalletStore,
)

MAX_STORE_TRANSACTION_ID = 512
MAX_CREDIT_BATCH = 1000
MAX_GIFT_COUNT = 100_000
MAX_COINS = 10**12
MAX_REASON = 512
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_TIMESTAMP_SECONDS = 253402300799  # 9999-12-31T23:59:59Z

STORES: dict[int, Store] = {pb.STORE_APP_STORE: Store.APP_STORE, pb.STORE_GOOGLE_PLAY: Store.GOOGLE_PLAY}
ENVIRONMENTS: dict[int, Environment] = {
    pb.STORE_ENVIRONMENT_PRODUCTION: Environment.PRODUCTION,
    pb.STORE_ENVIRONMENT_SANDBOX: Environment.SANDBOX,
}
_ENVIRONMENT_PROTO: dict[Environment, Any] = {v: k for k, v in ENVIRONMENTS.items()}
MAX_LISTED_PURCHASES = 1000
PERIODS: dict[int, Period] = {
    pb.LIMIT_PERIOD_DAILY: Period.DAILY,
    pb.LIMIT_PERIOD_WEEKLY: Period.WEEKLY,
    pb.LIMIT_PERIOD_MONTHLY: Period.MONTHLY,
}
PERIOD_NUMBERS: dict[Period, Any] = {v: k for k, v in PERIODS.items()}
KINDS: dict[int, Kind] = {
    pb.TRANSACTION_KIND_PURCHASE: Kind.PURCHASE,
    pb.TRANSACTION_KIND_PURCHASE_REVERSAL: Kind.PURCHASE_REVERSAL,
    pb.TRANSACTION_KIND_PURCHASE_RESTORE: Kind.PURCHASE_RESTORE,
    pb.TRANSACTION_KIND_GIFT_SENT: Kind.GIFT_SENT,
    pb.TRANSACTION_KIND_GIFT_RECEIVED: Kind.GIFT_RECEIVED,
    pb.TRANSACTION_KIND_SPEND: Kind.SPEND,
    pb.TRANSACTION_KIND_RESERVATION: Kind.RESERVATION,
    pb.TRANSACTION_KIND_RESERVATION_COMMIT: Kind.RESERVATION_COMMIT,
    pb.TRANSACTION_KIND_RESERVATION_RELEASE: Kind.RESERVATION_RELEASE,
    pb.TRANSACTION_KIND_GIFT_REVERSAL: Kind.GIFT_REVERSAL,
    pb.TRANSACTION_KIND_GIFT_RESTORE: Kind.GIFT_RESTORE,
}
KIND_NUMBERS: dict[Kind, Any] = {v: k for k, v in KINDS.items()}
REVERSAL_STATES = {
    ReversalState.APPLIED: pb.REVERSAL_STATE_APPLIED,
    ReversalState.ALREADY_APPLIED: pb.REVERSAL_STATE_ALREADY_APPLIED,
    ReversalState.NOTHING_REFUNDED: pb.REVERSAL_STATE_NOTHING_REFUNDED,
}
LEG_KINDS = {
    LegKind.UNSPENT: pb.ClawbackLeg.KIND_UNSPENT,
    LegKind.GIFT: pb.ClawbackLeg.KIND_GIFT,
    LegKind.DEBT: pb.ClawbackLeg.KIND_DEBT,
}
RESERVATION_STATES = {
    ReservationState.HELD: pb.RESERVATION_STATE_HELD,
    ReservationState.COMMITTED: pb.RESERVATION_STATE_COMMITTED,
    ReservationState.RELEASED: pb.RESERVATION_STATE_RELEASED,
    ReservationState.EXPIRED: pb.RESERVATION_STATE_EXPIRED,
    ReservationState.SUBMITTED: pb.RESERVATION_STATE_SUBMITTED,
}


def _time(field: str, message: Any, has: bool) -> datetime | None:
    if not has:
        return None
    stamp: Timestamp = message
    if not 0 <= stamp.seconds <= _MAX_TIMESTAMP_SECONDS or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(field, "is not a valid timestamp")
    return stamp.ToDatetime(tzinfo=UTC)


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def balance_message(view: BalanceView) -> pb.Balance:
    return pb.Balance(
        account_id=view.account_id,
        coins=view.coins,
        diamonds=view.diamonds_total,
        diamonds_withdrawable=view.diamonds_withdrawable,
        diamonds_reserved=view.diamonds_reserved,
        restricted=view.restricted,
        debt_coins=view.debt_coins,
        diamond_debt=view.diamond_debt,
        sandbox_coins=view.sandbox_coins,
        sandbox_diamonds=max(view.sandbox_diamonds, 0),
        sandbox_debt_coins=view.sandbox_debt_coins,
    )


def reservation_message(view: ReservationView) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=view.reservation_id,
        account_id=view.account_id,
        diamonds=view.diamonds,
        state=RESERVATION_STATES[view.state],
        create_time=_stamp(view.created_at),
        expire_time=_stamp(view.expire_at),
        diamonds_clawed_back=view.clawed_diamonds,
        diamonds_taken=view.taken_diamonds,
        diamonds_shortfall=view.shortfall_diamonds,
        diamond_debt=view.shortfall_debt,
        review_reason=view.review_reason,
        diamond_debt_repaid=view.debt_repaid,
    )


def limit_message(view: LimitView) -> pb.SpendingLimit:
    limit = pb.SpendingLimit(
        period=PERIOD_NUMBERS[view.period], limit_coins=view.limit_coins, spent_coins=view.spent_coins
    )
    if view.pending_limit_coins is not None and view.pending_effective_at is not None:
        limit.pending_change.CopyFrom(
            pb.PendingLimitChange(
                limit_coins=view.pending_limit_coins, effective_time=_stamp(view.pending_effective_at)
            )
        )
    return limit


def transaction_message(item: HistoryItem) -> pb.Transaction:
    return pb.Transaction(
        transaction_id=item.txn_id,
        kind=KIND_NUMBERS[item.kind],
        create_time=_stamp(item.created_at),
        coins_delta=item.coins_delta,
        diamonds_delta=item.diamonds_delta,
        reference=item.reference,
        counterparty_account_id=item.counterparty,
        sandbox_coins_delta=item.sandbox_coins_delta,
        sandbox_diamonds_delta=item.sandbox_diamonds_delta,
        moved_by=item.moved_by.message(),
    )


def leg_message(leg: Leg) -> pb.ClawbackLeg:
    return pb.ClawbackLeg(
        kind=LEG_KINDS[leg.kind],
        coins=leg.coins,
        creator_account_id=leg.creator or "",
        diamonds=leg.diamonds,
        diamonds_from_holds=sum(d for _, d in leg.from_holds),
        diamond_debt=leg.debt,
    )


def consumption_message(view: ConsumptionView) -> pb.GetPurchaseConsumptionResponse:
    return pb.GetPurchaseConsumptionResponse(
        account_id=view.account_id,
        credit_sequence=view.lot_id,
        coins=view.coins,
        bonus_coins=view.bonus_coins,
        unspent_coins=view.open_coins,
        gift_coins=view.gift_coins,
        spend_coins=view.spend_coins,
        debt_repayment_coins=view.debt_repayment_coins,
        untracked_coins=view.untracked_coins,
        clawed_back_coins=view.clawed_back,
        consumed_percentage_milli=view.consumed_percentage_milli,
        creators=[
            pb.CreatorConsumption(
                creator_account_id=c.creator,
                coins=c.coins,
                diamonds=c.diamonds,
                diamonds_clawed_back=c.clawed_diamonds,
            )
            for c in view.creators
        ],
        credit_time=_stamp(view.created_at),
        evidence_sha256=view.evidence_sha256,
        credited_by=view.credited_by.message(),
    )


Outcome = Message | bytes | DomainError


def _answer(outcome: Outcome, response_type: type[Message]) -> Any:
    """A batch item's outcome: raise its refusal, or decode a replay's stored answer."""
    if isinstance(outcome, DomainError):
        raise outcome
    if isinstance(outcome, bytes):
        return response_type.FromString(outcome)
    return outcome


def _credit_response(result: CreditResult) -> Message:
    return pb.CreditPurchaseResponse(
        state=pb.CREDIT_STATE_ALREADY_CREDITED if result.already_credited else pb.CREDIT_STATE_CREDITED,
        transaction_id=result.txn_id,
        coins_credited=result.coins,
        bonus_coins=result.bonus_coins,
        balance=balance_message(result.balance),
    )


def _credit_result(outcome: Outcome) -> pb.CreditPurchaseResult:
    """One CreditPurchases item: CreditPurchase's answer, or the error it would raise."""
    if isinstance(outcome, DomainError):
        error = pb.ItemError(
            code=outcome.code.value[0], message=outcome.message, reason=outcome.reason, metadata=outcome.metadata
        )
        return pb.CreditPurchaseResult(error=error)
    if isinstance(outcome, bytes):
        return pb.CreditPurchaseResult(response=pb.CreditPurchaseResponse.FromString(outcome))
    response = outcome
    assert isinstance(response, pb.CreditPurchaseResponse)
    return pb.CreditPurchaseResult(response=response)


def _gift_response(item: DebitItem, done: DebitDone) -> Message:
    if item.creator is None:
        return pb.SpendCoinsResponse(
            transaction_id=done.txn_id,
            coins_spent=done.coins,
            balance=balance_message(done.balance),
            sandbox_coins_spent=done.sandbox_coins,
        )
    return pb.SendGiftResponse(
        transaction_id=done.txn_id,
        coins_spent=done.coins,
        diamonds_to_creator=done.diamonds,
        sender_balance=balance_message(done.balance),
        sandbox_coins_spent=done.sandbox_coins,
        sandbox_diamonds_to_creator=done.sandbox_diamonds,
    )


class WalletServiceServicer(pb_grpc.WalletServiceServicer):
    def __init__(
        self, store: WalletStore, catalog: Catalog, *, group_commit_window_seconds: float, group_commit_max: int
    ) -> None:
        self._store = store
        self._db = store.db
        self._catalog = catalog
        batching = Batching(group_commit_window_seconds, group_commit_max)
        self._gifts: GroupCommit[DebitItem, Outcome] | None = batching.group(self._run_debits)
        self._credits: GroupCommit[CreditItem, Outcome] | None = batching.group(self._run_credits)

    async def _run_debits(self, items: list[DebitItem]) -> list[Outcome]:
        return await self._db.run(self._store.debit_batch, items, _gift_response)

    async def _run_credits(self, items: list[CreditItem]) -> list[Outcome]:
        return await self._db.run(self._store.credit_batch, items, _credit_response)

    async def _debit(self, item: DebitItem, response_type: type[Message], grouped: bool) -> Any:
        if grouped and self._gifts is not None:
            outcome = await self._gifts.submit(item)
        else:
            outcome = (await self._run_debits([item]))[0]
        return _answer(outcome, response_type)

    # ------------------------------------------------------------ purchases

    async def CreditPurchase(self, request: pb.CreditPurchaseRequest, context: Any) -> pb.CreditPurchaseResponse:
        item = self._credit_item(request)
        if self._credits is not None:
            outcome = await self._credits.submit(item)
        else:
            outcome = (await self._run_credits([item]))[0]
        response: pb.CreditPurchaseResponse = _answer(outcome, pb.CreditPurchaseResponse)
        return response

    async def CreditPurchases(self, request: pb.CreditPurchasesRequest, context: Any) -> pb.CreditPurchasesResponse:
        count = len(request.requests)
        if not 1 <= count <= MAX_CREDIT_BATCH:
            raise InvalidArgument("requests", f"give 1 to {MAX_CREDIT_BATCH} purchases")
        outcomes: list[Outcome | None] = [None] * count
        items: list[tuple[int, CreditItem]] = []
        for index, one in enumerate(request.requests):
            try:
                items.append((index, self._credit_item(one)))
            except DomainError as error:
                outcomes[index] = error
        # The items join the group commit of single CreditPurchase calls.
        if self._credits is not None:
            credits = self._credits
            answers = await asyncio.gather(*(credits.submit(item) for _, item in items))
        else:
            answers = await self._run_credits([item for _, item in items]) if items else []
        for (index, _), answer in zip(items, answers, strict=True):
            outcomes[index] = answer
        return pb.CreditPurchasesResponse(
            results=[_credit_result(outcome) for outcome in outcomes if outcome is not None]
        )

    def _credit_item(self, request: pb.CreditPurchaseRequest) -> CreditItem:
        request_id = require_id("request_id", request.request_id)
        account_id = require_id("account_id", request.account_id)
        store = require_enum("store", request.store, STORES)
        store_transaction_id = require_id(
            "store_transaction_id", request.store_transaction_id, MAX_STORE_TRANSACTION_ID
        )
        product_id = require_id("product_id", request.product_id)
        coins = require_positive("coins", request.coins, MAX_COINS)
        bonus = require_non_negative("bonus_coins", request.bonus_coins, MAX_COINS)
        if bonus > coins:
            raise InvalidArgument("bonus_coins", "must not exceed coins (coins include the bonus)")
        quantity = require_positive("quantity", request.quantity)
        environment = require_enum("environment", request.environment, ENVIRONMENTS)
        storefront = require_text("storefront", request.storefront, 16, allow_empty=True)
        if not request.HasField("price"):
            raise InvalidArgument("price", "is required")
        price_minor = require_non_negative("price.amount_minor", request.price.amount_minor)
        price_currency = require_currency("price.currency_code", request.price.currency_code)
        purchase_time = _time("purchase_time", request.purchase_time, request.HasField("purchase_time"))
        evidence = request.evidence_sha256
        if evidence and not _SHA256.fullmatch(evidence):
            raise InvalidArgument("evidence_sha256", "must be 64 lower-case hex digits (a SHA-256) or empty")
        return CreditItem(
            request_id=request_id,
            request=request,
            account_id=account_id,
            store=store,
            store_transaction_id=store_transaction_id,
            product_id=product_id,
            coins=coins,
            bonus_coins=bonus,
            quantity=quantity,
            environment=environment,
            storefront=storefront,
            price_minor=price_minor,
            price_currency=price_currency,
            purchase_time=purchase_time,
            flagged_for_review=request.flagged_for_review,
            evidence_sha256=evidence,
            actor=Actor.of_request(request_id),
        )

    def _purchase_key(self, request: Any) -> tuple[Store, Environment, str]:
        store = require_enum("store", request.store, STORES)
        environment = require_enum("environment", request.environment, ENVIRONMENTS)
        store_transaction_id = require_id(
            "store_transaction_id", request.store_transaction_id, MAX_STORE_TRANSACTION_ID
        )
        return store, environment, store_transaction_id

    async def ReversePurchase(self, request: pb.ReversePurchaseRequest, context: Any) -> pb.ReversePurchaseResponse:
        request_id = require_id("request_id", request.request_id)
        actor = Actor.of_request(request_id)  # here: the store runs on another thread
        store, environment, store_transaction_id = self._purchase_key(request)
        quantity = require_non_negative("refunded_quantity", request.refunded_quantity)
        share = require_non_negative("refunded_percentage_milli", request.refunded_percentage_milli, PERCENT_MILLI_FULL)
        said = [bool(request.full_refund), quantity > 0, share > 0]
        if sum(said) != 1:
            # A full refund is said explicitly: a forgotten field must never claw everything back.
            raise InvalidArgument(
                "full_refund",
                "say exactly one of full_refund, refunded_quantity or refunded_percentage_milli",
            )
        require_text("reason", request.reason, MAX_REASON, allow_empty=True)

        def build(result: ReversalResult) -> pb.ReversePurchaseResponse:
            return pb.ReversePurchaseResponse(
                state=REVERSAL_STATES[result.state],
                coins_reversed=result.coins,
                account_id=result.account_id,
                balance=balance_message(result.balance),
                legs=[leg_message(leg) for leg in result.legs],
            )

        return await self._db.run(
            lambda: self._store.reverse_purchase(
                request_id=request_id,
                request=request,
                response_type=pb.ReversePurchaseResponse,
                build=build,
                store=store,
                environment=environment,
                store_transaction_id=store_transaction_id,
                refunded_quantity=quantity,
                refunded_percentage_milli=share,
                full_refund=request.full_refund,
                actor=actor,
            )
        )

    async def RestorePurchase(self, request: pb.RestorePurchaseRequest, context: Any) -> pb.RestorePurchaseResponse:
        request_id = require_id("request_id", request.request_id)
        actor = Actor.of_request(request_id)  # here: the store runs on another thread
        store, environment, store_transaction_id = self._purchase_key(request)
        require_text("reason", request.reason, MAX_REASON, allow_empty=True)

        def build(result: ReversalResult) -> pb.RestorePurchaseResponse:
            return pb.RestorePurchaseResponse(
                state=REVERSAL_STATES[result.state],
                coins_restored=result.coins,
                account_id=result.account_id,
                balance=balance_message(result.balance),
                legs=[leg_message(leg) for leg in result.legs],
            )

        return await self._db.run(
            lambda: self._store.restore_purchase(
                request_id=request_id,
                request=request,
                response_type=pb.RestorePurchaseResponse,
                build=build,
                store=store,
                environment=environment,
                store_transaction_id=store_transaction_id,
                actor=actor,
            )
        )

    async def GetPurchaseConsumption(
        self, request: pb.GetPurchaseConsumptionRequest, context: Any
    ) -> pb.GetPurchaseConsumptionResponse:
        store, environment, store_transaction_id = self._purchase_key(request)
        view = await self._db.run(self._store.consumption, store, environment, store_transaction_id)
        return consumption_message(view)

    async def ListCreditedPurchases(
        self, request: pb.ListCreditedPurchasesRequest, context: Any
    ) -> pb.ListCreditedPurchasesResponse:
        store = require_enum("store", request.store, STORES)
        since = _time("credited_since", request.credited_since, request.HasField("credited_since"))
        before = _time("credited_before", request.credited_before, request.HasField("credited_before"))
        after = require_non_negative("after_credit_sequence", request.after_credit_sequence)
        size = require_non_negative("page_size", request.page_size, MAX_LISTED_PURCHASES) or 500
        rows = await self._db.run(self._store.credited_purchases, store, since, before, after, size)
        return pb.ListCreditedPurchasesResponse(
            purchases=[
                pb.CreditedPurchase(
                    store=request.store,
                    environment=_ENVIRONMENT_PROTO[row.environment],
                    store_transaction_id=row.store_transaction_id,
                    account_id=row.account_id,
                    product_id=row.product_id,
                    quantity=row.quantity,
                    credit_sequence=row.lot_id,
                    credit_time=_stamp(row.created_at),
                )
                for row in rows
            ],
            next_credit_sequence=rows[-1].lot_id if len(rows) == size else 0,
        )

    # ------------------------------------------------------------ gifts and spending

    async def SendGift(self, request: pb.SendGiftRequest, context: Any) -> pb.SendGiftResponse:
        request_id = require_id("request_id", request.request_id)
        sender = require_id("sender_account_id", request.sender_account_id)
        creator = require_id("creator_account_id", request.creator_account_id)
        gift_id = require_id("gift_id", request.gift_id)
        count = require_positive("count", request.count, MAX_GIFT_COUNT)
        live_stream_id = optional_id("live_stream_id", request.live_stream_id)
        if sender == creator:
            raise InvalidArgument("creator_account_id", "an account cannot send a gift to itself", reason="SELF_GIFT")
        gift = self._catalog.gift(gift_id)
        if gift is None:
            raise NotFound("GIFT_NOT_FOUND", f"no gift {gift_id!r} in the catalog")
        item = DebitItem(
            method="SendGift",
            request_id=request_id,
            request=request,
            sender=sender,
            coins=gift.coin_price * count,
            reference=gift_id,
            creator=creator,
            diamonds=self._catalog.diamonds_for_gift(gift, count),
            live_stream_id=live_stream_id,
            actor=Actor.of_request(request_id),
        )
        response: pb.SendGiftResponse = await self._debit(item, pb.SendGiftResponse, grouped=True)
        return response

    async def SpendCoins(self, request: pb.SpendCoinsRequest, context: Any) -> pb.SpendCoinsResponse:
        request_id = require_id("request_id", request.request_id)
        account_id = require_id("account_id", request.account_id)
        purpose = require_id("purpose", request.purpose, 64)
        coins = require_positive("coins", request.coins, MAX_COINS)
        reference = optional_id("reference", request.reference)
        item = DebitItem(
            method="SpendCoins",
            request_id=request_id,
            request=request,
            sender=account_id,
            coins=coins,
            reference=f"{purpose}:{reference}" if reference else purpose,
            actor=Actor.of_request(request_id),
        )
        response: pb.SpendCoinsResponse = await self._debit(item, pb.SpendCoinsResponse, grouped=False)
        return response

    async def SetSpendingLimit(self, request: pb.SetSpendingLimitRequest, context: Any) -> pb.SetSpendingLimitResponse:
        request_id = require_id("request_id", request.request_id)
        account_id = require_id("account_id", request.account_id)
        period = require_enum("period", request.period, PERIODS)
        limit_coins = require_non_negative("limit_coins", request.limit_coins, MAX_COINS)

        def build(view: LimitView, now_effective: bool, effective_at: datetime) -> pb.SetSpendingLimitResponse:
            return pb.SetSpendingLimitResponse(
                limit=limit_message(view), effective_now=now_effective, effective_time=_stamp(effective_at)
            )

        return await self._db.run(
            lambda: self._store.set_limit(
                request_id=request_id,
                request=request,
                response_type=pb.SetSpendingLimitResponse,
                build=build,
                account_id=account_id,
                period=period,
                limit_coins=limit_coins,
            )
        )

    async def GetSpendingLimits(
        self, request: pb.GetSpendingLimitsRequest, context: Any
    ) -> pb.GetSpendingLimitsResponse:
        account_id = require_id("account_id", request.account_id)
        views = await self._db.run(self._store.limits, account_id)
        return pb.GetSpendingLimitsResponse(limits=[limit_message(v) for v in views])

    async def ListGifts(self, request: pb.ListGiftsRequest, context: Any) -> pb.ListGiftsResponse:
        return pb.ListGiftsResponse(
            gifts=[
                pb.Gift(
                    gift_id=gift.gift_id,
                    name=gift.name,
                    coin_price=gift.coin_price,
                    diamonds_to_creator=self._catalog.diamonds_for_gift(gift, 1),
                )
                for gift in self._catalog.gifts
            ]
        )

    # ------------------------------------------------------------ balances and history

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.GetBalanceResponse:
        account_id = require_id("account_id", request.account_id)
        view = await self._db.run(self._store.balance, account_id)
        return pb.GetBalanceResponse(balance=balance_message(view))

    async def ListTransactions(self, request: pb.ListTransactionsRequest, context: Any) -> pb.ListTransactionsResponse:
        account_id = require_id("account_id", request.account_id)
        size = page_size("page_size", request.page_size)
        token = require_text("page_token", request.page_token, 256, allow_empty=True)
        kinds: Sequence[Kind] = [require_enum("kinds", k, KINDS) for k in request.kinds]
        start = _time("start_time", request.start_time, request.HasField("start_time"))
        end = _time("end_time", request.end_time, request.HasField("end_time"))
        items, next_token = await self._db.run(
            lambda: self._store.history(account_id, page_size=size, page_token=token, kinds=kinds, start=start, end=end)
        )
        return pb.ListTransactionsResponse(
            transactions=[transaction_message(i) for i in items], next_page_token=next_token
        )

    # ------------------------------------------------------------ reservations

    async def ReserveDiamonds(self, request: pb.ReserveDiamondsRequest, context: Any) -> pb.ReserveDiamondsResponse:
        request_id = require_id("request_id", request.request_id)
        actor = Actor.of_request(request_id)  # here: the store runs on another thread
        account_id = require_id("account_id", request.account_id)
        diamonds = require_positive("diamonds", request.diamonds, MAX_COINS)
        reservation_id = require_id("reservation_id", request.reservation_id)
        expire_at = _time("expire_time", request.expire_time, request.HasField("expire_time"))

        def build(reservation: ReservationView, view: BalanceView) -> pb.ReserveDiamondsResponse:
            return pb.ReserveDiamondsResponse(
                reservation=reservation_message(reservation), balance=balance_message(view)
            )

        return await self._db.run(
            lambda: self._store.reserve(
                request_id=request_id,
                request=request,
                response_type=pb.ReserveDiamondsResponse,
                build=build,
                account_id=account_id,
                diamonds=diamonds,
                reservation_id=reservation_id,
                expire_at=expire_at,
                actor=actor,
            )
        )

    async def CommitReservation(
        self, request: pb.CommitReservationRequest, context: Any
    ) -> pb.CommitReservationResponse:
        item = _settle_item(request.request_id, request.reservation_id, True, request.diamonds, "", "")
        outcome = (await self._db.run(self._store.settle_holds, [item], _settled))[0]
        return _answer(outcome, pb.CommitReservationResponse)  # type: ignore[no-any-return]

    async def ReleaseReservation(
        self, request: pb.ReleaseReservationRequest, context: Any
    ) -> pb.ReleaseReservationResponse:
        item = _settle_item(request.request_id, request.reservation_id, False, 0, request.reason, "")
        outcome = (await self._db.run(self._store.settle_holds, [item], _settled))[0]
        return _answer(outcome, pb.ReleaseReservationResponse)  # type: ignore[no-any-return]

    async def SubmitReservations(
        self, request: pb.SubmitReservationsRequest, context: Any
    ) -> pb.SubmitReservationsResponse:
        _batch_size("items", len(request.items))
        items = [
            SubmitHold(
                require_id(f"items[{i}].reservation_id", item.reservation_id),
                require_positive(f"items[{i}].diamonds", item.diamonds, MAX_COINS),
            )
            for i, item in enumerate(request.items)
        ]
        answers = await self._db.run(self._store.submit_holds, items)
        return pb.SubmitReservationsResponse(
            results=[
                pb.SubmitResult(
                    reservation=reservation_message(view) if view is not None else None,
                    error_reason=error.reason if error is not None else "",
                    error_message=error.message if error is not None else "",
                )
                for view, error in answers
            ]
        )

    async def SettleReservations(
        self, request: pb.SettleReservationsRequest, context: Any
    ) -> pb.SettleReservationsResponse:
        _batch_size("items", len(request.items))
        items: list[SettleHold] = []
        for i, wanted in enumerate(request.items):
            if wanted.action not in (pb.SettleItem.ACTION_COMMIT, pb.SettleItem.ACTION_RELEASE):
                raise InvalidArgument(f"items[{i}].action", "must be ACTION_COMMIT or ACTION_RELEASE")
            commit = wanted.action == pb.SettleItem.ACTION_COMMIT
            items.append(
                _settle_item(
                    wanted.request_id,
                    wanted.reservation_id,
                    commit,
                    wanted.diamonds,
                    wanted.reason,
                    f"items[{i}].",
                )
            )
        outcomes = await self._db.run(self._store.settle_holds, items, _settled)
        results = []
        for item, outcome in zip(items, outcomes, strict=True):
            result = pb.SettleResult(request_id=item.request_id)
            if isinstance(outcome, DomainError):
                result.error_code = outcome.code.name
                result.error_reason = outcome.reason
                result.error_message = outcome.message
            elif isinstance(outcome, pb.CommitReservationResponse | pb.ReleaseReservationResponse):
                result.reservation.CopyFrom(outcome.reservation)
            else:  # a replay: the single call's stored answer
                raw = outcome if isinstance(outcome, bytes) else outcome.SerializeToString()
                reply = (pb.CommitReservationResponse if item.commit else pb.ReleaseReservationResponse).FromString(raw)
                result.reservation.CopyFrom(reply.reservation)
            results.append(result)
        return pb.SettleReservationsResponse(results=results)


MAX_BATCH_ITEMS = 15_000


def _batch_size(field: str, count: int) -> None:
    if not 0 < count <= MAX_BATCH_ITEMS:
        raise InvalidArgument(field, f"must hold 1 to {MAX_BATCH_ITEMS} items, not {count}")


def _settle_item(
    request_id: str,
    reservation_id: str,
    commit: bool,
    diamonds: int,
    reason: str,
    prefix: str,
) -> SettleHold:
    """A commit or release, keyed like the single call (its method and request message)."""
    request_id = require_id(f"{prefix}request_id", request_id)
    reservation_id = require_id(f"{prefix}reservation_id", reservation_id)
    request: Message
    if commit:
        diamonds = require_non_negative(f"{prefix}diamonds", diamonds, MAX_COINS)
        request = pb.CommitReservationRequest(request_id=request_id, reservation_id=reservation_id, diamonds=diamonds)
    else:
        require_text(f"{prefix}reason", reason, MAX_REASON, allow_empty=True)
        request = pb.ReleaseReservationRequest(request_id=request_id, reservation_id=reservation_id, reason=reason)
    # Read here, on the event loop: the store runs on another thread.
    return SettleHold(request_id, reservation_id, commit, diamonds, request, Actor.of_request(request_id))


def _settled(item: SettleHold, view: ReservationView) -> Message:
    if item.commit:
        return pb.CommitReservationResponse(reservation=reservation_message(view))
    return pb.ReleaseReservationResponse(reservation=reservation_message(view))
