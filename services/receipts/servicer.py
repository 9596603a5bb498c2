"""Thin gRPC servicer of the receipts service: validate, call the domain, map back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from google.protobuf.message import Message

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
from services.common.catalog import Catalog
from services.common.clock import Clock
from services.common.errors import DomainError
from services.common.validation import optional_id, require_enum, require_id, require_text
from services.receipts.apple.consumption import ConsentRepository
from services.receipts.apple.verify import ApplePurchases
from services.receipts.convert import STORE_FROM_PB, product_pb, record_pb, result_pb, timestamp
from services.receipts.errors import InvalidArgument, NotFound
from services.receipts.google.verify import GooglePurchases, require_purchase_token
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.model import Claim, Environment, PurchaseResult
from services.receipts.purchases.outbox import AlreadyAnswered
from services.receipts.purchases.repository import BindingRepository, PurchaseRepository, RequestRecorder

M = TypeVar("M", bound=Message)

MAX_STORE_TRANSACTION_ID = 512
MAX_SIGNED_TRANSACTION = 64 * 1024
MAX_APP_RECEIPT = 1024 * 1024
MAX_PRODUCT_ID = 256
ENVIRONMENT_HINTS: dict[int, Environment | None] = {
    pb.STORE_ENVIRONMENT_UNSPECIFIED: None,
    pb.STORE_ENVIRONMENT_PRODUCTION: Environment.PRODUCTION,
    pb.STORE_ENVIRONMENT_SANDBOX: Environment.SANDBOX,
}


@dataclass(eq=False, kw_only=True)
class ReceiptServiceServicer(pb_grpc.ReceiptServiceServicer):
    """RPCs without an implementation here answer UNIMPLEMENTED (the generated default)."""

    purchases: PurchaseRepository
    bindings: BindingRepository
    binding: Binding
    catalog: Catalog
    clock: Clock
    apple: ApplePurchases
    google: GooglePurchases
    consents: ConsentRepository

    async def idempotent(
        self,
        method: str,
        request_id: str,
        request: Message,
        response_type: type[M],
        build: Callable[[Sequence[PurchaseResult]], M],
        work: Callable[[RequestRecorder], Awaitable[Sequence[PurchaseResult]]],
    ) -> M:
        """AIP-155 around a value-moving call whose effects are themselves
        exactly-once (keyed by store transaction): replay the stored response,
        refuse a reused id with a different body, else do the work and record
        its response — in the purchase's own transaction when the work takes the
        recorder, else in a transaction of its own.

        The stored response is looked up in the transaction that records the purchase
        (no read of its own, the costliest step of a group-committed purchase), so
        the proof is verified first; a call that fails before recording anything
        falls back to a read, so an answered call gets its answer whatever happens
        to the store or the proof since."""
        recorder = RequestRecorder(self.purchases.requests, method, request_id, request, build)
        try:
            results = await work(recorder)
        except AlreadyAnswered as answered:
            stored: bytes | None = answered.response
        except DomainError:
            stored = await self.purchases.replay(method, request_id, request)
            if stored is None:
                raise
        else:
            if recorder.done:
                # Built once, inside the transaction that recorded it.
                stored, response = recorder.stored, cast(M, recorder.response)
            else:
                response = build(results)
                stored = await self.purchases.remember(method, request_id, request, response)
            if stored is None:
                return response
        assert stored is not None
        replayed = response_type()
        replayed.ParseFromString(stored)
        return replayed

    async def GetPurchaseBinding(
        self, request: pb.GetPurchaseBindingRequest, context: Any
    ) -> pb.GetPurchaseBindingResponse:
        account_id = require_id("account_id", request.account_id)
        binding = self.binding
        token, obfuscated = binding.app_account_token(account_id), binding.obfuscated_account_id(account_id)
        # Store notifications name only these values: remember whose they are (insert-once).
        await self.purchases.database.run(self.bindings.record_now, account_id, token, obfuscated, self.clock.now())
        return pb.GetPurchaseBindingResponse(app_account_token=token, obfuscated_account_id=obfuscated)

    async def GetPurchase(self, request: pb.GetPurchaseRequest, context: Any) -> pb.GetPurchaseResponse:
        store = require_enum("store", request.store, STORE_FROM_PB)
        transaction_id = require_text("store_transaction_id", request.store_transaction_id, MAX_STORE_TRANSACTION_ID)
        record = await self.purchases.get(store, transaction_id)
        if record is None:
            raise NotFound("PURCHASE_NOT_FOUND", "no purchase with this store transaction id")
        return pb.GetPurchaseResponse(purchase=record_pb(record))

    async def ListProducts(self, request: pb.ListProductsRequest, context: Any) -> pb.ListProductsResponse:
        if request.store == pb.STORE_UNSPECIFIED:
            stores = list(STORE_FROM_PB.values())
        else:
            stores = [require_enum("store", request.store, STORE_FROM_PB)]
        now = self.clock.now()
        catalog = self.catalog
        products = [
            product_pb(pack, catalog.promotion_for(pack.store, pack.product_id, now))
            for store in stores
            for pack in catalog.packs_for(store)
        ]
        return pb.ListProductsResponse(products=products)

    async def VerifyApplePurchase(
        self, request: pb.VerifyApplePurchaseRequest, context: Any
    ) -> pb.VerifyApplePurchaseResponse:
        request_id = require_id("request_id", request.request_id)
        account_id = require_id("account_id", request.account_id)
        proof = request.WhichOneof("proof")
        if proof is None:
            raise InvalidArgument("proof", "give one of signed_transaction, transaction_id or app_receipt")
        if proof == "signed_transaction":
            require_text("signed_transaction", request.signed_transaction, MAX_SIGNED_TRANSACTION)
        elif proof == "transaction_id":
            require_id("transaction_id", request.transaction_id)
        else:
            require_text("app_receipt", request.app_receipt, MAX_APP_RECEIPT)
        hint = require_enum("environment_hint", request.environment_hint, ENVIRONMENT_HINTS)

        claim = Claim(account_id, request_id, request.account_region)

        async def work(recorder: RequestRecorder) -> list[PurchaseResult]:
            return await self.apple.verify(
                claim,
                signed_transaction=request.signed_transaction,
                transaction_id=request.transaction_id,
                app_receipt=request.app_receipt,
                environment_hint=hint,
                recorder=recorder,
            )

        def build(results: Sequence[PurchaseResult]) -> pb.VerifyApplePurchaseResponse:
            return pb.VerifyApplePurchaseResponse(purchases=[result_pb(r) for r in results])

        return await self.idempotent(
            "VerifyApplePurchase", request_id, request, pb.VerifyApplePurchaseResponse, build, work
        )

    async def VerifyGooglePurchase(
        self, request: pb.VerifyGooglePurchaseRequest, context: Any
    ) -> pb.VerifyGooglePurchaseResponse:
        request_id = require_id("request_id", request.request_id)
        account_id = require_id("account_id", request.account_id)
        product_id = require_id("product_id", request.product_id, MAX_PRODUCT_ID)
        token = require_purchase_token(request.purchase_token)
        package_name = optional_id("package_name", request.package_name, MAX_PRODUCT_ID)

        claim = Claim(account_id, request_id, request.account_region)

        async def work(recorder: RequestRecorder) -> list[PurchaseResult]:
            return [await self.google.verify(claim, product_id, token, package_name, recorder)]

        def build(results: Sequence[PurchaseResult]) -> pb.VerifyGooglePurchaseResponse:
            return pb.VerifyGooglePurchaseResponse(purchase=result_pb(results[0]))

        return await self.idempotent(
            "VerifyGooglePurchase", request_id, request, pb.VerifyGooglePurchaseResponse, build, work
        )

    async def RecordConsumptionConsent(
        self, request: pb.RecordConsumptionConsentRequest, context: Any
    ) -> pb.RecordConsumptionConsentResponse:
        account_id = require_id("account_id", request.account_id)
        consent = await self.purchases.database.run(
            self.consents.record, account_id, request.consented, self.clock.now()
        )
        return pb.RecordConsumptionConsentResponse(
            account_id=consent.account_id, consented=consent.consented, update_time=timestamp(consent.updated_at)
        )
