"""Android Publisher API v3 client for one-time products.

Built on google-api-python-client's bundled ``androidpublisher`` v3 discovery
document (no discovery fetch at run time) and google-auth service-account
credentials (the JWT-bearer flow against the key file's ``token_uri``).
The discovery document is parsed and the CA bundle loaded once per process.

Two ways out, both through the outbound policy (https only in production,
response size cap, deadline, no redirects):
- the blocking methods (the consume worker, the notification handler,
  reconciliation) execute on ``PolicyHttp`` (a thread-safe httpx client with a
  pool of kept-alive connections) behind google-auth-httplib2's
  ``AuthorizedHttp``; one built service serves every thread;
- the async methods (``VerifyGooglePurchase``'s look-up) use no thread:
  googleapiclient still builds the request (URI, method, headers, body) and
  parses the answer with its JSON model, raising ``HttpError`` as ``execute``
  does, but the request goes out on the policy's async httpx client on the
  event loop. google-auth supplies the Authorization header; its token refresh
  is a blocking HTTP call, so it runs on a thread, only when the credentials
  are invalid or expired (or Google answered 401, as ``AuthorizedHttp``
  handles it), and one at a time.

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
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import google.auth.exceptions
import google.auth.transport
import google_auth_httplib2
import httplib2
import httpx
from google.oauth2 import service_account
from googleapiclient import discovery
from googleapiclient.errors import HttpError
from googleapiclient.http import MAX_URI_LENGTH, HttpRequest

from services.common.errors import Unavailable
from services.common.outbound import OutboundPolicy, PolicyHttp, PolicySession, httplib2_response
from services.receipts.google.rules import PurchaseV2, VoidedPage, VoidedPurchase, VoidedQuery

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/androidpublisher"


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
    httpx.HTTPError,
)
# What AuthorizedHttp does on a 401: refresh the token and send again, at most twice.
_REFRESH_STATUS = tuple(google.auth.transport.DEFAULT_REFRESH_STATUS_CODES)
_MAX_REFRESHES = google.auth.transport.DEFAULT_MAX_REFRESH_ATTEMPTS


@dataclass(frozen=True)
class _Resources:
    service: Any
    productsv2: Any
    purchase_v2: _Template  # productsv2.getproductpurchasev2, for the async look-up
    products: Any
    voided: Any
    credentials: service_account.Credentials
    # Token refreshes go out through the policy too (blocking; the async path runs them on a thread).
    auth_request: google_auth_httplib2.Request


@dataclass(frozen=True)
class _AsyncSide:
    """The async path's state on one event loop: its client, and the lock that lets one refresh run at a time."""

    loop: asyncio.AbstractEventLoop
    http: PolicySession
    refreshing: asyncio.Lock


@dataclass(frozen=True)
class _Prepared:
    uri: str
    method: str
    body: Any
    headers: dict[str, str]


class _Handover(Exception):
    def __init__(self, prepared: _Prepared) -> None:
        super().__init__("prepared")
        self.prepared = prepared


class _Capture:
    """An ``http`` for ``HttpRequest.execute`` that sends nothing: googleapiclient
    finishes the request its own way (content-length; an over-long GET URI turned
    into a POST with ``x-http-method-override``) and this hands it back."""

    def request(
        self,
        uri: str,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> tuple[httplib2.Response, bytes]:
        raise _Handover(_Prepared(uri, method, body, dict(headers or {})))


def _prepared(request: HttpRequest) -> _Prepared:
    try:
        request.execute(http=_Capture())
    except _Handover as handover:
        return handover.prepared
    raise AssertionError("HttpRequest.execute returned without sending")


@dataclass(frozen=True)
class _Template:
    """One method's request as googleapiclient builds and finishes it, built once with a
    marker in place of each (string) path parameter: a call puts its values in, quoted as
    uritemplate quotes a simple expansion. Building the request from the discovery document
    each time (validation, uritemplate, ``HttpRequest.execute``) cost 32.5 µs of CPU a
    request alone, 5–6 % of receipts' profile samples per Play purchase under load; filling
    one in, 4.5 µs. A URI that would be too long for a GET (googleapiclient then sends a
    POST) is built by googleapiclient as before."""

    build: Callable[..., HttpRequest]
    prepared: _Prepared
    request: HttpRequest  # its postproc (the JSON model) answers every call of the method
    # The URI cut at the markers: its text, then parameter, text, parameter, …, text.
    parts: tuple[str, ...]

    @classmethod
    def of(cls, build: Callable[..., HttpRequest], *parameters: str) -> _Template:
        marker_of = {name: f"coinstore-marker-{name}" for name in parameters}
        request = build(**marker_of)
        prepared = _prepared(request)
        if prepared.method != "GET" or any(prepared.uri.count(marker) != 1 for marker in marker_of.values()):
            raise AssertionError(f"{prepared.method} {prepared.uri}: not a GET with each path parameter once")
        cut = re.split("(" + "|".join(map(re.escape, marker_of.values())) + ")", prepared.uri)
        name_of = {marker: name for name, marker in marker_of.items()}
        return cls(build, prepared, request, tuple(name_of.get(part, part) for part in cut))

    def fill(self, **values: str) -> tuple[_Prepared, HttpRequest]:
        # Odd places hold parameter names: each value goes only where its own marker was.
        uri = "".join(quote(values[part], safe="") if i % 2 else part for i, part in enumerate(self.parts))
        if len(uri) > MAX_URI_LENGTH:
            request = self.build(**values)
            return _prepared(request), request
        return replace(self.prepared, uri=uri), self.request


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
        connections: int = 64,
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
        self._connections = connections
        self._lock = threading.Lock()
        self._credentials: service_account.Credentials | None = None
        self._resources: _Resources | None = None
        self._async: _AsyncSide | None = None

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
        googleapiclient's resources and models hold no per-request state (each
        call builds its own ``HttpRequest``).
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
        transport = PolicyHttp(self._outbound, self._timeout, connections=self._connections)
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
        productsv2 = purchases.productsv2()
        return _Resources(
            service,
            productsv2,
            _Template.of(productsv2.getproductpurchasev2, "packageName", "token"),
            purchases.products(),
            purchases.voidedpurchases(),
            credentials,
            google_auth_httplib2.Request(transport),
        )

    def _delay(self, attempt: int) -> float:
        return float(min(self._max_backoff, self._backoff * 2**attempt) * (0.5 + random.random() / 2))

    def _call(self, what: str, make: Callable[[_Resources], HttpRequest]) -> Any:
        """Execute one API request with retries of the retryable failures."""
        last = ""
        for attempt in range(self._attempts):
            try:
                return make(self._service()).execute(num_retries=0)
            except (HttpError, google.auth.exceptions.RefreshError, *_TRANSPORT_ERRORS) as exc:
                last = _retryable(what, exc)
            if attempt + 1 < self._attempts:
                self._sleep(self._delay(attempt))
        log.warning("Google Play %s failed after %d attempts: %s", what, self._attempts, last)
        raise StoreUnavailable(last)

    async def _acall(self, what: str, make: Callable[[_Resources], tuple[_Prepared, HttpRequest]]) -> Any:
        """:meth:`_call` on the event loop: the same retries and the same answers."""
        last = ""
        for attempt in range(self._attempts):
            try:
                # The first call builds the service (key file, discovery document) on a thread.
                resources = self._resources if self._resources is not None else await asyncio.to_thread(self._service)
                return await self._send(resources, *make(resources))
            except (HttpError, google.auth.exceptions.RefreshError, *_TRANSPORT_ERRORS) as exc:
                last = _retryable(what, exc)
            if attempt + 1 < self._attempts:
                await asyncio.sleep(self._delay(attempt))
        log.warning("Google Play %s failed after %d attempts: %s", what, self._attempts, last)
        raise StoreUnavailable(last)

    def _async_side(self) -> _AsyncSide:
        """This loop's client and refresh lock (a client's connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        side = self._async
        if side is None or side.loop is not loop:
            http = self._outbound.session(self._timeout, connections=self._connections)
            side = self._async = _AsyncSide(loop, http, asyncio.Lock())
        return side

    async def _send(self, resources: _Resources, prepared: _Prepared, request: HttpRequest) -> Any:
        """One request googleapiclient built (``prepared``, from ``request``), sent on the async
        client and answered as ``HttpRequest.execute`` over ``AuthorizedHttp`` answers it."""
        side = self._async_side()
        refreshes = 0
        while True:
            headers = dict(prepared.headers)
            token = await self._authorize(resources, side, prepared, headers)
            reply = await side.http.request(prepared.method, prepared.uri, body=prepared.body, headers=headers)
            if reply.status not in _REFRESH_STATUS or refreshes == _MAX_REFRESHES:
                break
            # The token may have been revoked or expired early: a new one, and the request again.
            refreshes += 1
            await self._refresh(resources, side, token)
        response, content = httplib2_response(reply)
        if response.status >= 300:
            raise HttpError(response, content, uri=prepared.uri)
        return request.postproc(response, content)

    async def _authorize(
        self, resources: _Resources, side: _AsyncSide, prepared: _Prepared, headers: dict[str, str]
    ) -> str | None:
        """Add google-auth's headers (refreshing first if the token is missing or expiring); the token used."""
        credentials = resources.credentials
        if not credentials.valid:
            await self._refresh(resources, side, credentials.token)
        token: str | None = credentials.token
        if credentials.valid:
            # Valid credentials send nothing here: before_request only adds the headers.
            credentials.before_request(  # type: ignore[no-untyped-call]
                resources.auth_request, prepared.method, prepared.uri, headers
            )
        else:
            # A token shorter-lived than google-auth's refresh margin: use it as it is, not refresh per call.
            credentials.apply(headers)  # type: ignore[no-untyped-call]
        return token

    async def _refresh(self, resources: _Resources, side: _AsyncSide, stale: str | None) -> None:
        """Replace the token ``stale`` (a blocking HTTP call, on a thread); one refresh at a
        time, and none if another call already replaced it while this one waited."""
        credentials = resources.credentials
        async with side.refreshing:
            if credentials.valid and credentials.token != stale:
                return
            await asyncio.to_thread(credentials.refresh, resources.auth_request)

    def close(self) -> None:
        if self._resources is not None:
            self._resources.service.close()

    async def aclose(self) -> None:
        """Close the async client (on the loop that uses it), then the blocking side."""
        side, self._async = self._async, None
        if side is not None and side.loop is asyncio.get_running_loop():
            await side.http.aclose()
        self.close()

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

    # --- async API (on the event loop) ----------------------------------------------

    async def aget_purchase_v2(self, package_name: str, token: str) -> PurchaseV2:
        """purchases.productsv2.getproductpurchasev2, without a thread."""
        body = await self._acall(
            "productsv2.getproductpurchasev2",
            lambda s: s.purchase_v2.fill(packageName=package_name, token=token),
        )
        return PurchaseV2.parse(body)


def _retryable(what: str, exc: Exception) -> str:
    """Why a failed attempt may be retried; raises the failures that are final."""
    if isinstance(exc, HttpError):
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
        return str(error)
    if isinstance(exc, google.auth.exceptions.RefreshError):
        if _refresh_is_transient(exc):
            return f"token endpoint: {exc}"
        log.error(
            "the Google OAuth token endpoint refused the service account in"
            " COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE (%s): the key may be deleted or disabled; create a"
            " new JSON key for the service account and point the setting at it",
            exc,
        )
        raise StoreAuthFailed(f"token request refused: {exc}") from None
    return f"{type(exc).__name__}: {exc}"


def _refresh_is_transient(error: google.auth.exceptions.RefreshError) -> bool:
    retryable = getattr(error, "retryable", False)
    return bool(retryable) or "internal_failure" in str(error) or "Temporary" in str(error)
