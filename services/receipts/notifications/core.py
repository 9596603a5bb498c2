"""PurchaseActions over the receipts core's one exactly-once path
(`services.receipts.purchases.crediting.Crediting`), for the synchronous Celery worker.

The core is asyncio (grpc.aio wallet channel), so the worker runs one event
loop in a background thread per process and submits coroutines to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from services.common.catalog import StoreId
from services.common.errors import DomainError, NotFound, Unavailable
from services.receipts.apple.client import AppStoreApi
from services.receipts.apple.jws import AppleJwsVerifier
from services.receipts.apple.rules import ApplePolicy, check_transaction
from services.receipts.google.client import PlayApiError, PlayClient
from services.receipts.google.verify import GooglePurchases
from services.receipts.notifications.ports import Applied, Refused, StoreUnavailable, VerificationFailed
from services.receipts.purchases.crediting import Crediting
from services.receipts.purchases.model import Environment, Outcome, StoredState, VerifiedPurchase
from services.receipts.purchases.repository import PurchaseStore

T = TypeVar("T")

CALL_TIMEOUT_SECONDS = 60.0
_STORES = {"APP_STORE": StoreId.APP_STORE, "GOOGLE_PLAY": StoreId.GOOGLE_PLAY}
# The environment a store's message names ('' or anything else: the one the purchase was recorded in).
STORE_ENVIRONMENTS = {"Production": Environment.PRODUCTION, "Sandbox": Environment.SANDBOX}


class LoopThread:
    """An event loop running in a daemon thread; ``run`` blocks for one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="receipts-core-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return run_on(self.loop, coroutine)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def run_on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on ``loop`` (owned by another thread) and wait for it."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(CALL_TIMEOUT_SECONDS)


class CoreActions:
    def __init__(
        self,
        crediting: Crediting,
        store: PurchaseStore,
        loop: asyncio.AbstractEventLoop,
        apple_policy: ApplePolicy,
        google: GooglePurchases | None = None,
    ) -> None:
        self._crediting = crediting
        self._store = store
        self._loop = loop
        self._apple_policy = apple_policy
        self._google = google

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            return run_on(self._loop, coroutine)
        except Unavailable as exc:
            raise StoreUnavailable(exc.message) from exc
        except NotFound:
            raise
        except DomainError as exc:
            raise Refused(exc.reason) from exc

    def _apple_purchase(self, transaction: Mapping[str, Any]) -> VerifiedPurchase:
        """The same App Store rules as VerifyApplePurchase (bundle, environment,
        consumable, ownership, quantity): a notification credits nothing the app's
        own report would not."""
        try:
            return check_transaction(dict(transaction), self._apple_policy, "signedTransactionInfo")
        except DomainError as exc:
            raise Refused(exc.reason) from exc

    def credit_apple(self, account_id: str, transaction: Mapping[str, Any], request_id: str) -> Applied:
        purchase = self._apple_purchase(transaction)
        result = self._run(self._crediting.credit(purchase, account_id, request_id=request_id))
        return Applied(result.outcome is Outcome.CREDITED, result.outcome.value)

    def record_apple(self, transaction: Mapping[str, Any]) -> None:
        self._run(self._crediting.record(self._apple_purchase(transaction)))

    def credit_google(self, account_id: str | None, product_id: str, purchase_token: str, request_id: str) -> Applied:
        if self._google is None:
            raise StoreUnavailable("no Google Play path configured")
        try:
            result = self._run(self._google.credit_token(purchase_token, product_id, account_id, request_id=request_id))
        except NotFound as error:
            # Google does not know the token: nothing to credit, and retrying will not change
            # that. (Other refusals arrive as Refused from _run and finish the notification.)
            return Applied(False, error.reason.lower())
        return Applied(result.outcome is Outcome.CREDITED, result.outcome.value)

    def reverse(
        self,
        *,
        store: str,
        store_transaction_id: str,
        environment: str,
        full: bool,
        refunded_quantity: int,
        refunded_percentage_milli: int,
        reason: str,
        request_id: str,
    ) -> Applied:
        # The purchases row already holds this cumulative refund: nothing to ask the wallet
        # (whose AIP-155 replay would repeat the original "applied" answer).
        record = self._run(self._store.get(_STORES[store], store_transaction_id))
        state = (0, 0) if full else (refunded_quantity, refunded_percentage_milli)
        if (
            record is not None
            and record.state is StoredState.REFUNDED
            and (record.refunded_quantity, record.refunded_percentage_milli) == state
        ):
            return Applied(False, "already refunded")
        try:
            result = self._run(
                self._crediting.reverse(
                    _STORES[store],
                    store_transaction_id,
                    environment=STORE_ENVIRONMENTS.get(environment),
                    full=full,
                    refunded_quantity=refunded_quantity,
                    refunded_percentage_milli=refunded_percentage_milli,
                    reason=reason,
                    request_id=request_id,
                )
            )
        except NotFound:
            return Applied(False, "unknown_purchase")
        if result.nothing_refunded:
            return Applied(False, "nothing_refunded")
        return Applied(result.applied, f"{result.coins_moved} coins")

    def restore(
        self, *, store: str, store_transaction_id: str, environment: str, reason: str, request_id: str
    ) -> Applied:
        try:
            result = self._run(
                self._crediting.restore(
                    _STORES[store],
                    store_transaction_id,
                    environment=STORE_ENVIRONMENTS.get(environment),
                    reason=reason,
                    request_id=request_id,
                )
            )
        except NotFound:
            return Applied(False, "unknown_purchase")
        return Applied(result.applied, f"{result.coins_moved} coins")


class CoreAppleVerifier:
    """The core's AppleJwsVerifier (the same one VerifyApplePurchase uses) as the
    notifications' port. Called from a worker thread; the OCSP path (online
    checks) runs on the loop that owns the core's HTTP client."""

    def __init__(self, verifier: AppleJwsVerifier, loop: asyncio.AbstractEventLoop) -> None:
        self._verifier = verifier
        self._loop = loop

    def verify(self, jws: str) -> Mapping[str, Any]:
        try:
            if not self._verifier.online_checks:
                return self._verifier.verify(jws, "signedPayload")
            # OCSP runs on the loop that owns the core's HTTP client.
            return run_on(self._loop, self._verifier.verify_async(jws, "signedPayload"))
        except DomainError as exc:
            if isinstance(exc, Unavailable):
                raise
            raise VerificationFailed(f"{exc.reason}: {exc.message}") from None


_ENVIRONMENTS = {"Production": Environment.PRODUCTION, "Sandbox": Environment.SANDBOX}


class CoreAppleApi:
    """The core's async App Store Server API client as the notifications' port."""

    def __init__(self, api: AppStoreApi, loop: asyncio.AbstractEventLoop) -> None:
        self._api = api
        self._loop = loop

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            return run_on(self._loop, coroutine)
        except Unavailable as exc:
            raise StoreUnavailable(exc.message) from exc

    def send_consumption_information(self, transaction_id: str, environment: str, body: Mapping[str, Any]) -> None:
        self._run(
            self._api.send_consumption_information(
                _ENVIRONMENTS.get(environment, Environment.PRODUCTION), transaction_id, body
            )
        )

    def get_refund_history(self, transaction_id: str, environment: str, revision: str | None) -> Mapping[str, Any]:
        page = self._run(
            self._api.get_refund_history(
                _ENVIRONMENTS.get(environment, Environment.PRODUCTION), transaction_id, revision or ""
            )
        )
        return {
            "revision": page.revision,
            "hasMore": page.has_more,
            "signedTransactions": list(page.signed_transactions),
        }


class CorePlayApi:
    """The Google Play work's Android Publisher client as the notifications' port."""

    def __init__(self, client: PlayClient) -> None:
        self._client = client

    def get_product_purchase_v2(self, package_name: str, purchase_token: str) -> Mapping[str, Any]:
        try:
            return self._client.get_purchase_v2(package_name, purchase_token).raw
        except Unavailable as exc:
            raise StoreUnavailable(exc.message) from exc

    def list_voided_purchases(
        self, package_name: str, start_time_ms: int, end_time_ms: int, page_token: str | None
    ) -> Mapping[str, Any]:
        try:
            page = self._client.list_voided_page(
                package_name, start_time_ms=start_time_ms, end_time_ms=end_time_ms, page_token=page_token or ""
            )
        except Unavailable as exc:
            raise StoreUnavailable(exc.message) from exc
        except PlayApiError as exc:
            raise StoreUnavailable(f"voidedpurchases.list: {exc}") from exc
        records = [
            {
                "purchaseToken": v.purchase_token,
                "orderId": v.order_id,
                "voidedReason": v.voided_reason,
                "voidedSource": v.voided_source,
                **({"voidedQuantity": v.voided_quantity} if v.voided_quantity is not None else {}),
            }
            for v in page.purchases
        ]
        answer: dict[str, Any] = {"voidedPurchases": records}
        if page.next_page_token:
            answer["tokenPagination"] = {"nextPageToken": page.next_page_token}
        return answer
