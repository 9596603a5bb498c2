"""VerifyApplePurchase: the three kinds of proof, down to the one crediting path.

- a StoreKit 2 signed transaction: verify the JWS, apply the App Store rules,
  check the appAccountToken against the account's binding, credit;
- a transaction id: Get Transaction Info (Production, then Sandbox when the
  policy allows, or the device's environment hint), then as above;
- a legacy app receipt: take a transaction id from it, read the customer's
  Get Transaction History v2 (consumables), credit each consumable once. A
  transaction in the history that belongs to another account is left out of
  the answer; if nothing is left, the first refusal is the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from services.common.errors import DomainError
from services.common.metrics import Metrics
from services.receipts.apple.app_receipt import parse_app_receipt
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.apple.rules import ApplePolicy, app_account_token, check_transaction
from services.receipts.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Environment, PurchaseResult, VerifiedPurchase
from services.receipts.purchases.repository import RequestRecorder

log = logging.getLogger(__name__)


class ApplePurchases:
    def __init__(
        self,
        verifier: AppleJwsVerifier,
        api: AppStoreApi,
        crediting: Crediting,
        binding: Binding,
        policy: ApplePolicy,
        metrics: Metrics,
    ) -> None:
        self.verifier = verifier
        self.api = api
        self.policy = policy
        self._crediting = crediting
        self._binding = binding
        self._refusals = metrics.counter(
            "coinstore_receipts_apple_refusals", "App Store proofs refused, by reason", ("reason",)
        )

    async def verified_purchase(self, jws: str, field: str) -> tuple[VerifiedPurchase, dict[str, Any]]:
        """Verify a signed transaction and apply the App Store rules (no account yet)."""
        payload = await self.verifier.verify_async(jws, field)
        return check_transaction(payload, self.policy, field), payload

    def check_account(self, payload: dict[str, Any], account_id: str) -> None:
        """appAccountToken present and not this account's → PERMISSION_DENIED ACCOUNT_MISMATCH."""
        token = app_account_token(payload)
        if token and not self._binding.app_account_token_matches(account_id, token):
            raise PermissionDenied(
                "ACCOUNT_MISMATCH",
                "the purchase was made for another account (appAccountToken)",
                {"store_transaction_id": str(payload.get("transactionId", ""))},
            )

    async def _credit_signed(
        self,
        jws: str,
        field: str,
        account_id: str,
        request_id: str,
        account_region: str,
        fetched_from: Environment | None = None,
        recorder: RequestRecorder | None = None,
    ) -> PurchaseResult:
        purchase, payload = await self.verified_purchase(jws, field)
        if fetched_from is not None and purchase.environment is not fetched_from:
            raise FailedPrecondition(
                "WRONG_ENVIRONMENT", "the App Store answered with a transaction of another environment"
            )
        self.check_account(payload, account_id)
        return await self._crediting.credit(
            purchase, account_id, request_id=request_id, account_region=account_region, recorder=recorder
        )

    async def verify(
        self,
        *,
        account_id: str,
        request_id: str,
        account_region: str,
        signed_transaction: str = "",
        transaction_id: str = "",
        app_receipt: str = "",
        environment_hint: Environment | None = None,
        recorder: RequestRecorder | None = None,
    ) -> list[PurchaseResult]:
        """Verify one proof and credit what it proves. A ``recorder`` gets the
        answer of a single-transaction proof recorded with its purchase."""
        try:
            if signed_transaction:
                return [
                    await self._credit_signed(
                        signed_transaction,
                        "signed_transaction",
                        account_id,
                        request_id,
                        account_region,
                        recorder=recorder,
                    )
                ]
            if transaction_id:
                environment, signed = await self.api.find_transaction(
                    transaction_id, self._lookup_order(environment_hint, account_id)
                )
                return [
                    await self._credit_signed(
                        signed, "transaction_id", account_id, request_id, account_region, environment, recorder
                    )
                ]
            return await self._verify_receipt(app_receipt, account_id, request_id, account_region, environment_hint)
        except DomainError as error:
            self._refusals.labels(error.reason).inc()
            raise

    def _lookup_order(self, hint: Environment | None, account_id: str) -> list[Environment]:
        return self.policy.lookup_order(hint, self._crediting.sandbox.allows(account_id))

    async def _verify_receipt(
        self,
        app_receipt: str,
        account_id: str,
        request_id: str,
        account_region: str,
        environment_hint: Environment | None,
    ) -> list[PurchaseResult]:
        receipt = parse_app_receipt(app_receipt)
        if receipt.bundle_id and receipt.bundle_id != self.policy.bundle_id:
            raise InvalidArgument("app_receipt", "the receipt is for another app", "WRONG_BUNDLE")
        if not receipt.transaction_ids or receipt.transaction_ids == ("0",):
            raise FailedPrecondition("NO_TRANSACTIONS", "the receipt holds no App Store in-app purchase")
        anchor = receipt.transaction_ids[0]
        missing: NotFound | None = None
        for environment in self._lookup_order(environment_hint, account_id):
            results: list[PurchaseResult] = []
            refusal: DomainError | None = None
            try:
                async for page in self.api.transaction_history(environment, anchor):
                    for signed in page.signed_transactions:
                        try:
                            results.append(
                                await self._credit_signed(
                                    signed, "app_receipt", account_id, request_id, account_region, environment
                                )
                            )
                        except (PermissionDenied, FailedPrecondition) as error:
                            log.info("receipt transaction left out: %s", error.reason)
                            refusal = refusal or error
            except NotFound as error:
                missing = error
                continue
            if not results and refusal is not None:
                raise refusal
            return results
        raise missing or NotFound("TRANSACTION_NOT_FOUND", "the App Store does not know the receipt's transactions")
