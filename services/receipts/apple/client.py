"""Client of the App Store Server API (the parts coin packs need).

- Auth: ES256 JWT signed with the In-App Purchase key (header ``kid``, ``typ``
  JWT; claims ``iss``, ``iat``, ``exp`` = iat + 30 min (Apple allows ≤ 60),
  ``aud`` = appstoreconnect-v1, ``bid``), reused until five minutes before expiry.
- Every call has a timeout. 429 waits until ``Retry-After`` (a UNIX time in ms,
  as Apple sends it; a small number is read as seconds) and retries; 5xx,
  timeouts and connection errors retry with exponential backoff and jitter; when
  the attempts run out → UNAVAILABLE. 404 → NOT_FOUND; 401 → UNAVAILABLE
  ``APP_STORE_AUTH_FAILED`` (a configuration problem, logged).
- Get Transaction Info, Get Transaction History v2 (``productType`` filter,
  paging by ``revision``), Get Refund History v2, Get Notification History,
  Send Consumption Information (v2). Responses are not trusted: callers verify
  every signed item with :class:`AppleJwsVerifier`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.settings import SettingsError
from services.receipts.purchases.model import Environment

log = logging.getLogger(__name__)

AUDIENCE = "appstoreconnect-v1"
TOKEN_LIFETIME_SECONDS = 30 * 60
TOKEN_REFRESH_MARGIN_SECONDS = 5 * 60
TRANSACTION_NOT_FOUND = 4040010
MAX_HISTORY_PAGES = 50


class ApiKeyError(SettingsError):
    """The In-App Purchase key cannot be used (stops start-up)."""


def load_api_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApiKeyError(f"COINSTORE_APPLE_API_KEY_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ApiKeyError(f"COINSTORE_APPLE_API_KEY_FILE: {path} is not an unencrypted .p8 key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ApiKeyError(f"COINSTORE_APPLE_API_KEY_FILE: {path} is not a P-256 key")
    return key


class TokenMinter:
    """App Store Server API bearer tokens, reused until near expiry."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        issuer_id: str,
        bundle_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._issuer_id = issuer_id
        self._bundle_id = bundle_id
        self.clock = clock
        self._token = ""
        self._expires = 0.0
        self._lock = threading.Lock()

    def token(self) -> str:
        now = self.clock()
        with self._lock:
            if now < self._expires - TOKEN_REFRESH_MARGIN_SECONDS:
                return self._token
            issued = int(now)
            claims = {
                "iss": self._issuer_id,
                "iat": issued,
                "exp": issued + TOKEN_LIFETIME_SECONDS,
                "aud": AUDIENCE,
                "bid": self._bundle_id,
            }
            self._token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._key_id, "typ": "JWT"})
            self._expires = issued + TOKEN_LIFETIME_SECONDS
            return self._token


@dataclass(frozen=True)
class HistoryPage:
    environment: Environment
    revision: str
    has_more: bool
    signed_transactions: tuple[str, ...]


@dataclass(frozen=True)
class RefundPage:
    revision: str
    has_more: bool
    signed_transactions: tuple[str, ...]


@dataclass(frozen=True)
class NotificationHistoryItem:
    signed_payload: str
    send_attempts: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class NotificationHistoryPage:
    items: tuple[NotificationHistoryItem, ...]
    has_more: bool
    pagination_token: str


@dataclass(frozen=True)
class AppStoreApiRetries:
    """Retries within one App Store Server API call (the inbox's schedule of retrying a
    stored notification is ``notifications.repository.RetryPolicy``)."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 2.0
    # Longest Retry-After wait honoured within one call; longer → UNAVAILABLE now.
    max_retry_after: float = 10.0


def _retry_after_seconds(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if number > 1e11:  # a UNIX time in milliseconds (Apple)
        return max(0.0, number / 1000 - now)
    return max(0.0, number)  # delta-seconds (RFC 9110)


@dataclass(eq=False)
class AppStoreApi:
    """The App Store Server API of one app, Production and Sandbox."""

    client: httpx.AsyncClient
    tokens: TokenMinter
    _: KW_ONLY
    production_url: str
    sandbox_url: str
    timeout_seconds: float
    retry: AppStoreApiRetries = field(default_factory=AppStoreApiRetries)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def _base_url(self, environment: Environment) -> str:
        url = self.production_url if environment is Environment.PRODUCTION else self.sandbox_url
        return url.rstrip("/")

    async def close(self) -> None:
        await self.client.aclose()

    # --- endpoints -----------------------------------------------------------

    async def get_transaction_info(self, environment: Environment, transaction_id: str) -> str:
        """Get Transaction Info: the signed transaction (finished consumables included)."""
        body = await self._call(
            environment, "GET", f"/inApps/v1/transactions/{quote(transaction_id, safe='')}", field="transaction_id"
        )
        return _string(body, "signedTransactionInfo")

    async def get_transaction_history(
        self,
        environment: Environment,
        transaction_id: str,
        revision: str = "",
        product_types: Sequence[str] = ("CONSUMABLE",),
    ) -> HistoryPage:
        """Get Transaction History v2, one page (≤ 20 transactions)."""
        params: list[tuple[str, str]] = [("productType", t) for t in product_types]
        if revision:
            params.append(("revision", revision))
        body = await self._call(
            environment,
            "GET",
            f"/inApps/v2/history/{quote(transaction_id, safe='')}",
            params=params,
            field="transaction_id",
        )
        return HistoryPage(
            environment,
            str(body.get("revision", "")),
            bool(body.get("hasMore", False)),
            tuple(_strings(body, "signedTransactions")),
        )

    async def transaction_history(
        self, environment: Environment, transaction_id: str, product_types: Sequence[str] = ("CONSUMABLE",)
    ) -> AsyncIterator[HistoryPage]:
        """Every page of the history, following ``revision`` while ``hasMore``."""
        revision = ""
        for _ in range(MAX_HISTORY_PAGES):
            page = await self.get_transaction_history(environment, transaction_id, revision, product_types)
            yield page
            if not page.has_more or not page.revision:
                return
            revision = page.revision

    async def get_refund_history(self, environment: Environment, transaction_id: str, revision: str = "") -> RefundPage:
        """Get Refund History v2, one page; keep the revision for incremental polling."""
        params = [("revision", revision)] if revision else []
        body = await self._call(
            environment,
            "GET",
            f"/inApps/v2/refund/lookup/{quote(transaction_id, safe='')}",
            params=params,
            field="transaction_id",
        )
        return RefundPage(
            str(body.get("revision", "")), bool(body.get("hasMore", False)), tuple(_strings(body, "signedTransactions"))
        )

    async def get_notification_history(
        self,
        environment: Environment,
        start_ms: int,
        end_ms: int,
        *,
        notification_type: str = "",
        transaction_id: str = "",
        only_failures: bool = False,
        pagination_token: str = "",
    ) -> NotificationHistoryPage:
        """Get Notification History (the last 180 days), one page."""
        request: dict[str, Any] = {"startDate": start_ms, "endDate": end_ms}
        if notification_type:
            request["notificationType"] = notification_type
        if transaction_id:
            request["transactionId"] = transaction_id
        if only_failures:
            request["onlyFailures"] = True
        params = [("paginationToken", pagination_token)] if pagination_token else []
        body = await self._call(environment, "POST", "/inApps/v1/notifications/history", params=params, json=request)
        items = []
        for raw in body.get("notificationHistory") or []:
            if isinstance(raw, dict) and isinstance(raw.get("signedPayload"), str):
                attempts = tuple(a for a in raw.get("sendAttempts") or [] if isinstance(a, dict))
                items.append(NotificationHistoryItem(raw["signedPayload"], attempts))
        return NotificationHistoryPage(
            tuple(items), bool(body.get("hasMore", False)), str(body.get("paginationToken", "") or "")
        )

    async def send_consumption_information(
        self, environment: Environment, transaction_id: str, request: Mapping[str, Any]
    ) -> None:
        """Send Consumption Information (v2); Apple answers 202 Accepted."""
        await self._call(
            environment,
            "PUT",
            f"/inApps/v2/transactions/consumption/{quote(transaction_id, safe='')}",
            json=dict(request),
            field="transaction_id",
        )

    async def find_transaction(
        self, transaction_id: str, environments: Sequence[Environment]
    ) -> tuple[Environment, str]:
        """Get Transaction Info in each environment in turn (Production first, then
        Sandbox, as the policy allows) until one knows the transaction."""
        missing: DomainError | None = None
        for environment in environments:
            try:
                return environment, await self.get_transaction_info(environment, transaction_id)
            except NotFound as error:
                missing = error
        raise missing or NotFound("TRANSACTION_NOT_FOUND", "the App Store does not know this transaction")

    # --- plumbing ------------------------------------------------------------

    async def _call(
        self,
        environment: Environment,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        json: Mapping[str, Any] | None = None,
        field: str = "",
    ) -> dict[str, Any]:
        url = self._base_url(environment) + path
        policy = self.retry
        last = "no attempt"
        for attempt in range(1, policy.attempts + 1):
            headers = {"Authorization": f"Bearer {self.tokens.token()}", "Accept": "application/json"}
            try:
                reply = await self.client.request(
                    method, url, params=list(params), json=json, headers=headers, timeout=self.timeout_seconds
                )
            except httpx.TimeoutException:
                last = "timed out"
                delay = self._backoff(attempt)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
                delay = self._backoff(attempt)
            else:
                status = reply.status_code
                if 200 <= status < 300:
                    return _json_object(reply) if reply.content else {}
                if status == 429:
                    wait = _retry_after_seconds(reply.headers.get("Retry-After"), self.clock())
                    if wait is not None and wait > policy.max_retry_after:
                        raise Unavailable(
                            "APP_STORE_RATE_LIMITED",
                            "the App Store Server API rate limit is exceeded; retry later",
                            {"retry_after_seconds": f"{wait:.1f}"},
                        )
                    last = "rate limited"
                    delay = wait if wait is not None else self._backoff(attempt)
                elif status >= 500:
                    last = f"HTTP {status}"
                    delay = self._backoff(attempt)
                else:
                    raise self._client_error(reply, field)
            if attempt < policy.attempts:
                log.info("App Store API %s %s: %s; retrying in %.2fs", method, path, last, delay)
                await self.sleep(delay)
        raise Unavailable("APP_STORE_UNAVAILABLE", f"the App Store Server API is unavailable ({last}); retry later")

    def _backoff(self, attempt: int) -> float:
        policy = self.retry
        delay: float = min(policy.max_delay, policy.base_delay * 2.0 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)

    def _client_error(self, reply: httpx.Response, field: str) -> DomainError:
        code = 0
        message = ""
        if reply.headers.get("content-type", "").startswith("application/json"):
            try:
                body = reply.json()
                code = int(body.get("errorCode", 0))
                message = str(body.get("errorMessage", ""))
            except (ValueError, TypeError, AttributeError):
                pass
        metadata = {"apple_error_code": str(code), "http_status": str(reply.status_code)}
        if reply.status_code == 404:
            reason = "TRANSACTION_NOT_FOUND" if code == TRANSACTION_NOT_FOUND else "APP_STORE_NOT_FOUND"
            return NotFound(reason, message or "not found at the App Store", metadata)
        if reply.status_code == 401:
            log.error("App Store Server API refused our token: check the In-App Purchase key, key id, issuer, bundle")
            return Unavailable("APP_STORE_AUTH_FAILED", "the App Store Server API refused our credentials", metadata)
        if code in (4000006, 4000008) and field:
            return InvalidArgument(
                field, message or "the App Store calls this transaction id invalid", "INVALID_TRANSACTION_ID"
            )
        return FailedPrecondition("APP_STORE_REJECTED", message or f"App Store HTTP {reply.status_code}", metadata)


def _json_object(reply: httpx.Response) -> dict[str, Any]:
    try:
        body = reply.json()
    except ValueError:
        raise Unavailable("APP_STORE_BAD_RESPONSE", "the App Store Server API answered with invalid JSON") from None
    if not isinstance(body, dict):
        raise Unavailable("APP_STORE_BAD_RESPONSE", "the App Store Server API answered with unexpected JSON")
    return body


def _string(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise Unavailable("APP_STORE_BAD_RESPONSE", f"the App Store Server API answer lacks {key}")
    return value


def _strings(body: Mapping[str, Any], key: str) -> list[str]:
    values = body.get(key) or []
    if not isinstance(values, list):
        raise Unavailable("APP_STORE_BAD_RESPONSE", f"the App Store Server API answer has a bad {key}")
    return [v for v in values if isinstance(v, str)]
