"""Android Publisher API v3 client for one-time products.

Built on google-api-python-client's bundled ``androidpublisher`` v3 discovery
document (no discovery fetch at run time) and google-auth service-account
credentials (the JWT-bearer flow against the key file's ``token_uri``).
The transport is ``PolicyHttp`` (an httpx client, thread-safe, with a pool of
kept-alive connections) rather than ``httplib2.Http``, so one built service
serves every thread: the discovery document is parsed and the CA bundle loaded
once per process, not once per thread. The async methods run the blocking
calls on this client's own thread pool, off the event loop.

Retryable failures (429, 5xx, timeouts, connection errors) are retried with
capped, jittered backoff and then reported as UNAVAILABLE. Rejected
credentials (401/403, or a refused token request) are UNAVAILABLE
``STORE_AUTH_FAILED`` with a log line telling the operator what to fix. Every
other HTTP error is a :class:`PlayApiError` for the caller to interpret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import google.auth.exceptions
import google_auth_httplib2
import httplib2
from google.oauth2 import service_account
from googleapiclient import discovery
from googleapiclient.errors import HttpError

from services.common.errors import Unavailable
from services.common.outbound import OutboundPolicy, PolicyHttp
from services.receipts.google.rules import PurchaseV2, VoidedPage, VoidedPurchase, VoidedQuery

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/androidpublisher"

T = TypeVar("T")


class StoreAuthFailed(Unavailable):
    def __init__(self, detail: str) -> None:
        super().__init__("STORE_AUTH_FAILED", "Google Play refused our credentials; retry later", {"store": "google"})
        self.detail = detail


class StoreUnavailable(Unavailable):
    def __init__(self, detail: str) -> None:
        super().__init__("STORE_UNAVAILABLE", "Google Play is not answering; retry later", {"store": "google"})
        self.detail = detail


class PlayApiError(Exception):
    """A non-retryable HTTP error from the Android Publisher API."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_http_error(cls, error: HttpError) -> PlayApiError:
        reason = ""
        details = error.error_details
        if isinstance(details, list) and details and isinstance(details[0], dict):
            reason = str(details[0].get("reason", ""))
        return cls(int(error.status_code), reason, str(error.reason))


_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_TRANSPORT_ERRORS = (
    socket.timeout,
    TimeoutError,
    ConnectionError,
    ssl.SSLError,
    httplib2.HttpLib2Error,
    OSError,
    google.auth.exceptions.TransportError,
)


@dataclass(frozen=True)
class _Resources:
    service: Any
    productsv2: Any
    products: Any
    voided: Any


class PlayClient:
    """The Android Publisher calls the receipts service makes."""

    def __init__(
        self,
        service_account_file: Path,
        *,
        endpoint: str = "",
        timeout_seconds: float = 10.0,
        attempts: int = 4,
        backoff_seconds: float = 0.2,
        max_backoff_seconds: float = 2.0,
        threads: int = 32,
        sleep: Callable[[float], None] = time.sleep,
        outbound: OutboundPolicy | None = None,
    ) -> None:
        self._key_file = service_account_file
        self._endpoint = endpoint.strip()
        self._timeout = timeout_seconds
        self._outbound = outbound or OutboundPolicy()
        self._attempts = max(1, attempts)
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._sleep = sleep
        self._threads = threads
        self._lock = threading.Lock()
        self._credentials: service_account.Credentials | None = None
        self._resources: _Resources | None = None
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="play")

    # --- plumbing ---------------------------------------------------------------

    def _load_credentials(self) -> service_account.Credentials:
        with self._lock:
            if self._credentials is None:
                try:
                    self._credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                        str(self._key_file), scopes=[SCOPE]
                    )
                except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                    log.error(
                        "cannot load the Google Play service-account key %s (%s): set"
                        " COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE to the JSON key of a service account invited in"
                        " Play Console with access to this app",
                        self._key_file,
                        exc,
                    )
                    raise StoreAuthFailed(f"cannot load {self._key_file}: {exc}") from None
            return self._credentials

    def _service(self) -> _Resources:
        """The Android Publisher resources, built once and shared by every thread.

        Sharing is safe because the transport is thread-safe (``PolicyHttp``) and
        googleapiclient's resources and models hold no per-request state.
        """
        resources = self._resources
        if resources is None:
            credentials = self._load_credentials()
            with self._lock:
                if self._resources is None:
                    self._resources = self._build(credentials)
                resources = self._resources
        return resources

    def _build(self, credentials: service_account.Credentials) -> _Resources:
        transport = PolicyHttp(self._outbound, self._timeout, connections=self._threads)
        http = google_auth_httplib2.AuthorizedHttp(credentials, http=transport)
        options = {"api_endpoint": self._endpoint} if self._endpoint else None
        service = discovery.build(
            "androidpublisher",
            "v3",
            http=http,
            static_discovery=True,
            cache_discovery=False,
            client_options=options,
        )
        purchases = service.purchases()
        return _Resources(service, purchases.productsv2(), purchases.products(), purchases.voidedpurchases())

    def _delay(self, attempt: int) -> float:
        return float(min(self._max_backoff, self._backoff * 2**attempt) * (0.5 + random.random() / 2))

    def _call(self, what: str, make: Callable[[_Resources], Any]) -> Any:
        """Execute one API request with retries of the retryable failures."""
        last = ""
        for attempt in range(self._attempts):
            try:
                return make(self._service()).execute(num_retries=0)
            except HttpError as exc:
                error = PlayApiError.from_http_error(exc)
                if error.status in (401, 403) and error.reason not in ("rateLimitExceeded", "userRateLimitExceeded"):
                    log.error(
                        "Google Play refused %s with %d %s (%s): check that the service account in"
                        " COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE is invited in Play Console (Users and permissions)"
                        " with access to the app and its financial data, that its key is current, and that"
                        " COINSTORE_GOOGLE_PACKAGE_NAME is right; new permissions can take up to 48 hours",
                        what,
                        error.status,
                        error.reason,
                        error.message,
                    )
                    raise StoreAuthFailed(str(error)) from None
                if error.status not in _RETRYABLE_STATUS and error.status != 403:
                    raise error from None
                last = str(error)
            except google.auth.exceptions.RefreshError as exc:
                if _refresh_is_transient(exc):
                    last = f"token endpoint: {exc}"
                else:
                    log.error(
                        "the Google OAuth token endpoint refused the service account in"
                        " COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE (%s): the key may be deleted or disabled; create a"
                        " new JSON key for the service account and point the setting at it",
                        exc,
                    )
                    raise StoreAuthFailed(f"token request refused: {exc}") from None
            except _TRANSPORT_ERRORS as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self._attempts:
                self._sleep(self._delay(attempt))
        log.warning("Google Play %s failed after %d attempts: %s", what, self._attempts, last)
        raise StoreUnavailable(last)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._resources is not None:
            self._resources.service.close()

    # --- blocking API -----------------------------------------------------------------

    def get_purchase_v2(self, package_name: str, token: str) -> PurchaseV2:
        """purchases.productsv2.getproductpurchasev2."""
        body = self._call(
            "productsv2.getproductpurchasev2",
            lambda s: s.productsv2.getproductpurchasev2(packageName=package_name, token=token),
        )
        return PurchaseV2.parse(body)

    def get_purchase(self, package_name: str, product_id: str, token: str) -> dict[str, Any]:
        """purchases.products.get (v1 ProductPurchase, as Google sends it)."""
        body: dict[str, Any] = self._call(
            "products.get",
            lambda s: s.products.get(packageName=package_name, productId=product_id, token=token),
        )
        return body

    def consume(self, package_name: str, product_id: str, token: str) -> None:
        """purchases.products.consume (also acknowledges)."""
        self._call(
            "products.consume",
            lambda s: s.products.consume(packageName=package_name, productId=product_id, token=token),
        )

    def acknowledge(self, package_name: str, product_id: str, token: str, developer_payload: str = "") -> None:
        body = {"developerPayload": developer_payload} if developer_payload else {}
        self._call(
            "products.acknowledge",
            lambda s: s.products.acknowledge(packageName=package_name, productId=product_id, token=token, body=body),
        )

    def list_voided_page(self, package_name: str, query: VoidedQuery, page_token: str = "") -> VoidedPage:
        """One page of purchases.voidedpurchases.list (oldest first); a page token carries the query on."""
        params: dict[str, Any] = {
            "packageName": package_name,
            "maxResults": query.max_results,
            "type": 1 if query.include_subscriptions else 0,
            "includeQuantityBasedPartialRefund": query.include_partial_refunds,
        }
        if page_token:
            params["token"] = page_token
        else:
            if query.start_time_ms is not None:
                params["startTime"] = str(query.start_time_ms)
            if query.end_time_ms is not None:
                params["endTime"] = str(query.end_time_ms)
        body = self._call("voidedpurchases.list", lambda s: s.voided.list(**params))
        records = tuple(VoidedPurchase.parse(v) for v in body.get("voidedPurchases") or [])
        next_token = str((body.get("tokenPagination") or {}).get("nextPageToken") or "")
        return VoidedPage(records, next_token)

    def iter_voided(self, package_name: str, query: VoidedQuery) -> Iterator[VoidedPurchase]:
        """Every voided purchase the query finds, following the page tokens."""
        page_token = ""
        while True:
            page = self.list_voided_page(package_name, query, page_token)
            yield from page.purchases
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    # --- async API (off the event loop) --------------------------------------------

    async def aget_purchase_v2(self, package_name: str, token: str) -> PurchaseV2:
        return await self._run(lambda: self.get_purchase_v2(package_name, token))


def _refresh_is_transient(error: google.auth.exceptions.RefreshError) -> bool:
    retryable = getattr(error, "retryable", False)
    return bool(retryable) or "internal_failure" in str(error) or "Temporary" in str(error)
