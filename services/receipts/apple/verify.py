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
from dataclasses import dataclass, replace
from typing import Any

from services.common.errors import DomainError
from services.receipts.apple.app_receipt import parse_app_receipt
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.apple.rules import ApplePolicy, app_account_token, check_transaction
from services.receipts.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Refusals
from services.receipts.purchases.binding import Binding
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Claim, Environment, PurchaseResult, VerifiedPurchase, evidence_hash
from services.receipts.purchases.repository import CreditHook

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ApplePurchases:
    """VerifyApplePurchase: ``verifier`` verifies any Apple JWS (transactions,
    notifications), ``api`` is the App Store Server API client, ``policy`` the
    bundle id and accepted environments."""

    verifier: AppleJwsVerifier
    api: AppStoreApi
    crediting: Crediting
    binding: Binding
    policy: ApplePolicy
    # coinstore_receipts_apple_refusals
    refusals: Refusals

    async def verified_purchase(self, jws: str, field: str) -> tuple[VerifiedPurchase, dict[str, Any]]:
        """Verify a signed transaction and apply the App Store rules (no account yet)."""
        payload = await self.verifier.verify_async(jws, field)
        purchase = replace(check_transaction(payload, self.policy, field), evidence_sha256=evidence_hash(jws))
        return purchase, payload

    def check_account(self, payload: dict[str, Any], account_id: str) -> None:
        """appAccountToken present and not this account's → PERMISSION_DENIED ACCOUNT_MISMATCH."""
        token = app_account_token(payload)
        if token and not self.binding.app_account_token_matches(account_id, token):
            raise PermissionDenied(
                "ACCOUNT_MISMATCH",
                "the purchase was made for another account (appAccountToken)",
                {"store_transaction_id": str(payload.get("transactionId", ""))},
            )

    async def _credit_signed(
        self,
        jws: str,
        field: str,
        claim: Claim,
        fetched_from: Environment | None = None,
        recorder: CreditHook | None = None,
    ) -> PurchaseResult:
        purchase, payload = await self.verified_purchase(jws, field)
        if fetched_from is not None and purchase.environment is not fetched_from:
            raise FailedPrecondition(
                "WRONG_ENVIRONMENT", "the App Store answered with a transaction of another environment"
            )
        self.check_account(payload, claim.account_id)
        return await self.crediting.credit(purchase, claim, recorder)

    async def verify(
        self,
        claim: Claim,
        *,
        signed_transaction: str = "",
        transaction_id: str = "",
        app_receipt: str = "",
        environment_hint: Environment | None = None,
        recorder: CreditHook | None = None,
    ) -> list[PurchaseResult]:
        """Verify one proof and credit what it proves. A ``recorder`` gets the
        answer of a single-transaction proof recorded with its purchase."""
        with self.refusals.counted():
            if signed_transaction:
                return [await self._credit_signed(signed_transaction, "signed_transaction", claim, recorder=recorder)]
            if transaction_id:
                environment, signed = await self.api.find_transaction(
                    transaction_id, self._lookup_order(environment_hint, claim.account_id)
                )
                return [await self._credit_signed(signed, "transaction_id", claim, environment, recorder)]
            return await self._verify_receipt(app_receipt, claim, environment_hint)

    def _lookup_order(self, hint: Environment | None, account_id: str) -> list[Environment]:
        return self.policy.lookup_order(hint, self.crediting.sandbox.allows(account_id))

    async def _verify_receipt(
        self, app_receipt: str, claim: Claim, environment_hint: Environment | None
    ) -> list[PurchaseResult]:
        receipt = parse_app_receipt(app_receipt)
        if receipt.bundle_id and receipt.bundle_id != self.policy.bundle_id:
            raise InvalidArgument("app_receipt", "the receipt is for another app", "WRONG_BUNDLE")
        if not receipt.transaction_ids or receipt.transaction_ids == ("0",):
            raise FailedPrecondition("NO_TRANSACTIONS", "the receipt holds no App Store in-app purchase")
        anchor = receipt.transaction_ids[0]
        missing: NotFound | None = None
        for environment in self._lookup_order(environment_hint, claim.account_id):
            results: list[PurchaseResult] = []
            refusal: DomainError | None = None
            try:
                async for page in self.api.transaction_history(environment, anchor):
                    for signed in page.signed_transactions:
                        try:
                            results.append(await self._credit_signed(signed, "app_receipt", claim, environment))
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
