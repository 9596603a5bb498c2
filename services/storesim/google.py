"""Google Play stand-in of the store simulator.

Speaks the Android Publisher API v3 wire format for one-time products
(``purchases.productsv2.getproductpurchasev2``, ``purchases.products`` get,
consume, acknowledge, and ``purchases.voidedpurchases.list``) with Google's
JSON shapes and error envelope, and an OAuth 2.0 token endpoint that runs the
real service-account flow: it checks the RS256 JWT assertion against the key
it generated and wrote to ``<state_dir>/google/service-account.json``.

Control endpoints under ``/google/sim/`` buy, complete, cancel, refund and
expire purchases and inject faults. Other simulator parts (Pub/Sub push of
real-time developer notifications) read and follow the state through the
:class:`PlayState` stored under :data:`PLAY_STATE`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.storesim.config import StoresimSettings

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/androidpublisher"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL, not a secret)
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_EMAIL = "coinstore-play@coinstore-sim.iam.gserviceaccount.com"
DEFAULT_PACKAGE = "com.coinstore.app"
ACCESS_TOKEN_SECONDS = 3600
VOIDED_MAX_RESULTS = 1000
VOIDED_WINDOW_MS = 30 * 24 * 3600 * 1000

# Purchase states (v2 names; v1 numbers below).
PURCHASED = "PURCHASED"
PENDING = "PENDING"
CANCELLED = "CANCELLED"
_V1_STATE = {PURCHASED: 0, CANCELLED: 1, PENDING: 2}

# voidedSource / voidedReason values of VoidedPurchase.
SOURCE_USER, SOURCE_DEVELOPER, SOURCE_GOOGLE = 0, 1, 2
REASON_OTHER, REASON_REMORSE, REASON_CHARGEBACK = 0, 1, 7


def _now_ms() -> int:
    return int(time.time() * 1000)


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_purchase_token() -> str:
    """A token shaped like Play's: 24 lowercase letters, a dot, then an ``AO-J1O`` base64url tail."""
    head = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(24))
    return f"{head}.AO-J1O{secrets.token_urlsafe(96)}"


def looks_like_token(token: str) -> bool:
    head, dot, tail = token.partition(".")
    return (
        bool(dot)
        and len(head) == 24
        and head.isalpha()
        and head.islower()
        and tail.startswith("AO-J1O")
        and all(c.isalnum() or c in "-_" for c in tail)
    )


def _new_order_id() -> str:
    digits = "".join(secrets.choice("0123456789") for _ in range(16))
    return f"GPA.{digits[:4]}-{digits[4:8]}-{digits[8:12]}-{digits[12:]}5"


@dataclass
class PlayPurchase:
    """One Play purchase token of a one-time product."""

    token: str
    package_name: str
    product_id: str
    quantity: int
    refundable_quantity: int
    state: str
    consumed: bool
    acknowledged: bool
    order_id: str | None
    obfuscated_account_id: str | None
    obfuscated_profile_id: str | None
    region_code: str
    test: bool
    purchase_time_ms: int
    completion_time_ms: int | None
    developer_payload: str = ""
    expired: bool = False
    consume_calls: int = 0

    def v2(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "androidpublisher#productPurchaseV2",
            "productLineItem": [
                {
                    "productId": self.product_id,
                    "productOfferDetails": {
                        "quantity": self.quantity,
                        "refundableQuantity": self.refundable_quantity,
                        "consumptionState": "CONSUMPTION_STATE_CONSUMED"
                        if self.consumed
                        else "CONSUMPTION_STATE_YET_TO_BE_CONSUMED",
                        "purchaseOptionId": "buy",
                    },
                }
            ],
            "purchaseStateContext": {"purchaseState": self.state},
            "acknowledgementState": "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
            if self.acknowledged
            else "ACKNOWLEDGEMENT_STATE_PENDING",
            "regionCode": self.region_code,
        }
        if self.order_id:
            body["orderId"] = self.order_id
        if self.completion_time_ms is not None:
            body["purchaseCompletionTime"] = _rfc3339(self.completion_time_ms)
        if self.obfuscated_account_id:
            body["obfuscatedExternalAccountId"] = self.obfuscated_account_id
        if self.obfuscated_profile_id:
            body["obfuscatedExternalProfileId"] = self.obfuscated_profile_id
        if self.test:
            body["testPurchaseContext"] = {"fopType": "TEST"}
        return body

    def v1(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "androidpublisher#productPurchase",
            "purchaseTimeMillis": str(self.purchase_time_ms),
            "purchaseState": _V1_STATE[self.state],
            "consumptionState": 1 if self.consumed else 0,
            "acknowledgementState": 1 if self.acknowledged else 0,
            "productId": self.product_id,
            "quantity": self.quantity,
            "refundableQuantity": self.refundable_quantity,
            "regionCode": self.region_code,
        }
        if self.developer_payload:
            body["developerPayload"] = self.developer_payload
        if self.order_id:
            body["orderId"] = self.order_id
        if self.obfuscated_account_id:
            body["obfuscatedExternalAccountId"] = self.obfuscated_account_id
        if self.obfuscated_profile_id:
            body["obfuscatedExternalProfileId"] = self.obfuscated_profile_id
        if self.test:
            body["purchaseType"] = 0
        return body


@dataclass(frozen=True)
class VoidedRecord:
    """One entry of voidedpurchases.list; ``recorded_ms`` is when the void was seen (the filter time)."""

    token: str
    order_id: str | None
    purchase_time_ms: int
    voided_time_ms: int
    recorded_ms: int
    source: int
    reason: int
    voided_quantity: int | None
    package_name: str

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "androidpublisher#voidedPurchase",
            "purchaseToken": self.token,
            "purchaseTimeMillis": str(self.purchase_time_ms),
            "voidedTimeMillis": str(self.voided_time_ms),
            "voidedSource": self.source,
            "voidedReason": self.reason,
        }
        if self.order_id:
            out["orderId"] = self.order_id
        if self.voided_quantity is not None:
            out["voidedQuantity"] = self.voided_quantity
        return out


@dataclass
class Fault:
    """An injected failure (status != 0) or delay for the next ``count`` matching calls.

    ``operation`` is one of getv2, get, consume, acknowledge, voided, token or ``*``.
    """

    operation: str
    status: int
    count: int
    delay_seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class PlayEvent:
    """A state change other simulator parts may announce (RTDN).

    kind: PURCHASED (became purchased), CANCELED (pending purchase cancelled),
    VOIDED (refund; ``voided`` holds the record).
    """

    kind: str
    purchase: PlayPurchase
    voided: VoidedRecord | None = None


class GoogleApiError(Exception):
    """An error answered in Google's JSON error envelope."""

    _STATUS: ClassVar[dict[int, str]] = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ABORTED",
        410: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        502: "UNAVAILABLE",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }

    def __init__(
        self, code: int, reason: str, message: str, *, domain: str = "androidpublisher", location: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.domain = domain
        self.location = location

    def response(self) -> web.Response:
        item: dict[str, str] = {"message": self.message, "domain": self.domain, "reason": self.reason}
        if self.location:
            item["location"] = self.location
            item["locationType"] = "parameter"
        body = {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [item],
                "status": self._STATUS.get(self.code, "UNKNOWN"),
            }
        }
        return web.json_response(body, status=self.code)


def _fault_error(status: int, reason: str) -> GoogleApiError:
    defaults = {
        401: ("permissionDenied", "The current user has insufficient permissions to perform the requested operation."),
        403: ("forbidden", "The caller does not have permission"),
        409: (
            "concurrentUpdate",
            "The operation could not be performed since the object was already in the process of being updated.",
        ),
        429: ("rateLimitExceeded", "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute'."),
    }
    default_reason, message = defaults.get(status, ("backendError", "Internal error encountered."))
    domain = "global" if status in (403, 429) or status >= 500 else "androidpublisher"
    return GoogleApiError(status, reason or default_reason, message, domain=domain)


class PlayState:
    """The simulator's Play world: purchases, voided records, the service account, faults.

    Methods are safe to call from other threads (tests drive it directly).
    """

    def __init__(self, state_dir: Path, package_name: str = DEFAULT_PACKAGE) -> None:
        self.default_package = package_name
        self.directory = state_dir / "google"
        self.service_account_path = self.directory / "service-account.json"
        self.purchases: dict[str, PlayPurchase] = {}
        self.voided: list[VoidedRecord] = []
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.revoked_service_account = False
        self._tokens: dict[str, float] = {}
        self._listeners: list[Callable[[PlayEvent], None]] = []
        self._lock = threading.RLock()
        self._key, self.key_id = self._load_or_create_key()

    # --- service account -------------------------------------------------

    def _load_or_create_key(self) -> tuple[rsa.RSAPrivateKey, str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        key_path = self.directory / "service-account-key.pem"
        kid_path = self.directory / "service-account-key.id"
        if key_path.exists() and kid_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if isinstance(key, rsa.RSAPrivateKey):
                return key, kid_path.read_text().strip()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        kid = secrets.token_hex(20)
        kid_path.write_text(kid)
        return key, kid

    def service_account_info(self, base_url: str) -> dict[str, str]:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account",
            "project_id": "coinstore-sim",
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": base_url.rstrip("/") + "/token",
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/" + CLIENT_EMAIL,
            "universe_domain": "googleapis.com",
        }

    def write_service_account(self, base_url: str) -> Path:
        """Write the key file whose token_uri points at this simulator (``base_url``)."""
        path = self.service_account_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.service_account_info(base_url), indent=2))
        tmp.chmod(0o600)
        tmp.replace(path)
        return path

    def issue_access_token(self, assertion: str, token_uri: str) -> str:
        """Check a JWT-bearer assertion signed with the service account's key; mint an access token."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self._key.public_key(),
                algorithms=["RS256"],
                # google-auth always addresses Google's token endpoint, whatever token_uri says.
                audience=[GOOGLE_TOKEN_AUDIENCE, token_uri],
                issuer=CLIENT_EMAIL,
                options={"require": ["iss", "aud", "exp", "iat"]},
                leeway=30,
            )
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_grant", f"Invalid JWT: {exc}") from None
        if header.get("kid") not in (None, self.key_id):
            raise OAuthError("invalid_grant", "Invalid JWT Signature.")
        if int(claims["exp"]) - int(claims["iat"]) > ACCESS_TOKEN_SECONDS:
            raise OAuthError("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)")
        if SCOPE not in str(claims.get("scope", "")).split():
            raise OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = "ya29.sim-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + ACCESS_TOKEN_SECONDS
        return token

    @property
    def access_tokens_issued(self) -> int:
        with self._lock:
            return len(self._tokens)

    def revoke_access_tokens(self) -> None:
        """Google may invalidate access tokens before they expire: the API answers 401 until a new one is used."""
        with self._lock:
            for token in self._tokens:
                self._tokens[token] = 0.0

    def check_access(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        with self._lock:
            expires = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expires is None or expires < time.time():
            raise GoogleApiError(
                401,
                "authError" if authorization else "required",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or"
                " other valid authentication credential.",
                domain="global",
            )
        if self.revoked_service_account:
            raise GoogleApiError(
                401,
                "permissionDenied",
                "The current user has insufficient permissions to perform the requested operation.",
            )

    # --- listeners and faults ----------------------------------------------

    def subscribe(self, listener: Callable[[PlayEvent], None]) -> None:
        """Call ``listener`` on every PURCHASED / CANCELED / VOIDED change (from the changing thread)."""
        self._listeners.append(listener)

    def _emit(self, event: PlayEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("Play event listener failed")

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, operation: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.count > 0 and fault.operation in (operation, "*"):
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    # --- purchases -----------------------------------------------------------

    def buy(
        self,
        product_id: str,
        *,
        account_id: str | None = None,
        profile_id: str | None = None,
        package_name: str | None = None,
        quantity: int = 1,
        pending: bool = False,
        test: bool = False,
        region_code: str = "US",
        token: str | None = None,
    ) -> PlayPurchase:
        if quantity < 1:
            raise ValueError("quantity must be at least 1")
        now = _now_ms()
        purchase = PlayPurchase(
            token=token or new_purchase_token(),
            package_name=package_name or self.default_package,
            product_id=product_id,
            quantity=quantity,
            refundable_quantity=quantity,
            state=PENDING if pending else PURCHASED,
            consumed=False,
            acknowledged=False,
            # Pending purchases have no order id until payment completes (Billing Library 7+).
            order_id=None if pending else _new_order_id(),
            obfuscated_account_id=account_id or None,
            obfuscated_profile_id=profile_id or None,
            region_code=region_code,
            test=test,
            purchase_time_ms=now,
            completion_time_ms=None if pending else now,
        )
        with self._lock:
            self.purchases[purchase.token] = purchase
        if not pending:
            self._emit(PlayEvent("PURCHASED", purchase))
        return purchase

    def get(self, token: str) -> PlayPurchase | None:
        with self._lock:
            return self.purchases.get(token)

    def _require(self, token: str) -> PlayPurchase:
        purchase = self.get(token)
        if purchase is None:
            raise KeyError(token)
        return purchase

    def complete(self, token: str) -> PlayPurchase:
        """The buyer paid a pending purchase."""
        with self._lock:
            purchase = self._require(token)
            if purchase.state != PENDING:
                raise ValueError(f"purchase is {purchase.state}, not PENDING")
            purchase.state = PURCHASED
            purchase.order_id = _new_order_id()
            purchase.completion_time_ms = _now_ms()
        self._emit(PlayEvent("PURCHASED", purchase))
        return purchase

    def cancel(self, token: str) -> PlayPurchase:
        """A pending purchase was never paid."""
        with self._lock:
            purchase = self._require(token)
            if purchase.state != PENDING:
                raise ValueError(f"purchase is {purchase.state}, not PENDING")
            purchase.state = CANCELLED
        self._emit(PlayEvent("CANCELED", purchase))
        return purchase

    def expire(self, token: str) -> PlayPurchase:
        """The token is no longer queryable (410 purchaseTokenNoLongerValid)."""
        with self._lock:
            purchase = self._require(token)
            purchase.expired = True
        return purchase

    def refund(
        self, token: str, quantity: int | None = None, *, reason: int = REASON_REMORSE, source: int = SOURCE_USER
    ) -> VoidedRecord:
        """Refund ``quantity`` units (all that remain when None); the void shows up in voidedpurchases."""
        with self._lock:
            purchase = self._require(token)
            if purchase.state != PURCHASED or purchase.refundable_quantity < 1:
                raise ValueError("nothing left to refund")
            amount = purchase.refundable_quantity if quantity is None else quantity
            if not 1 <= amount <= purchase.refundable_quantity:
                raise ValueError(f"can refund 1..{purchase.refundable_quantity} units")
            purchase.refundable_quantity -= amount
            full = purchase.refundable_quantity == 0
            if full:
                purchase.state = CANCELLED
            now = _now_ms()
            # Only a quantity-based partial refund carries voidedQuantity; the last one is a full refund.
            record = VoidedRecord(
                token=purchase.token,
                order_id=purchase.order_id,
                purchase_time_ms=purchase.purchase_time_ms,
                voided_time_ms=now,
                recorded_ms=max([now, *(v.recorded_ms + 1 for v in self.voided)]),
                source=source,
                reason=reason,
                voided_quantity=None if full else amount,
                package_name=purchase.package_name,
            )
            self.voided.append(record)
        self._emit(PlayEvent("VOIDED", purchase, record))
        return record

    # --- API operations (raise GoogleApiError like Google does) ---------------

    def lookup(self, package_name: str, token: str) -> PlayPurchase:
        purchase = self.get(token)
        if purchase is None:
            if not looks_like_token(token):
                raise GoogleApiError(400, "invalidValue", "Invalid Value", location="token")
            raise GoogleApiError(404, "purchaseTokenNotFound", "The purchase token was not found.", location="token")
        if purchase.package_name != package_name:
            raise GoogleApiError(
                400, "purchaseTokenDoesNotMatchPackageName", "The purchase token does not match the package name."
            )
        if purchase.expired:
            raise GoogleApiError(410, "purchaseTokenNoLongerValid", "The purchase token is no longer valid.")
        return purchase

    def lookup_product(self, package_name: str, product_id: str, token: str) -> PlayPurchase:
        purchase = self.lookup(package_name, token)
        if purchase.product_id != product_id:
            raise GoogleApiError(
                400, "purchaseTokenDoesNotMatchProductId", "The purchase token does not match the product ID."
            )
        return purchase

    def consume(self, package_name: str, product_id: str, token: str) -> None:
        with self._lock:
            purchase = self.lookup_product(package_name, product_id, token)
            purchase.consume_calls += 1
            if purchase.state != PURCHASED or purchase.consumed:
                raise _invalid_state()
            purchase.consumed = True
            purchase.acknowledged = True

    def acknowledge(self, package_name: str, product_id: str, token: str, payload: str) -> None:
        with self._lock:
            purchase = self.lookup_product(package_name, product_id, token)
            if purchase.state != PURCHASED or purchase.acknowledged:
                raise _invalid_state()
            purchase.acknowledged = True
            purchase.developer_payload = payload

    def list_voided(self, package_name: str, query: dict[str, str]) -> dict[str, Any]:
        page_token = query.get("token")
        if page_token:
            try:
                state = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"==="))
                start, end, offset = int(state["s"]), int(state["e"]), int(state["o"])
                include_partial = bool(state["p"])
                # startTime/endTime are ignored with a page token; maxResults still applies.
                max_results = _int_param(query, "maxResults", int(state["m"]))
            except (ValueError, KeyError, TypeError):
                raise GoogleApiError(400, "invalid", "Invalid pagination token", location="token") from None
            if not 1 <= max_results <= VOIDED_MAX_RESULTS:
                raise GoogleApiError(400, "invalid", "maxResults must be 1..1000", location="maxResults")
        else:
            now = _now_ms()
            end = _int_param(query, "endTime", now)
            start = _int_param(query, "startTime", now - VOIDED_WINDOW_MS)
            if end > now + 1000:
                raise GoogleApiError(400, "invalid", "endTime cannot be in the future", location="endTime")
            if start < now - VOIDED_WINDOW_MS - 60_000:
                raise GoogleApiError(400, "invalid", "startTime cannot be older than 30 days", location="startTime")
            if start > end:
                raise GoogleApiError(400, "invalid", "startTime must be before endTime", location="startTime")
            max_results = _int_param(query, "maxResults", VOIDED_MAX_RESULTS)
            if not 1 <= max_results <= VOIDED_MAX_RESULTS:
                raise GoogleApiError(400, "invalid", "maxResults must be 1..1000", location="maxResults")
            if _int_param(query, "type", 0) not in (0, 1):
                raise GoogleApiError(400, "invalid", "type must be 0 or 1", location="type")
            include_partial = query.get("includeQuantityBasedPartialRefund", "false").lower() == "true"
            offset = 0
        with self._lock:
            matching = [
                v
                for v in sorted(self.voided, key=lambda v: v.recorded_ms)
                if v.package_name == package_name
                and start <= v.recorded_ms <= end
                and (include_partial or v.voided_quantity is None)
            ]
        page = matching[offset : offset + max_results]
        body: dict[str, Any] = {
            "pageInfo": {"totalResults": len(matching), "resultPerPage": max_results, "startIndex": offset},
            "voidedPurchases": [v.body() for v in page],
        }
        if offset + max_results < len(matching):
            state = {"s": start, "e": end, "o": offset + max_results, "p": include_partial, "m": max_results}
            next_token = base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")
            body["tokenPagination"] = {"nextPageToken": next_token}
        return body


class OAuthError(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def _invalid_state() -> GoogleApiError:
    return GoogleApiError(
        400, "invalidPurchaseState", "The purchase is not in a valid state to perform the desired operation."
    )


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise GoogleApiError(400, "invalid", f"Invalid value for {name}", location=name) from None


PLAY_STATE: web.AppKey[PlayState] = web.AppKey("play_state", PlayState)

_API_PREFIX = "/androidpublisher/v3/applications/"


def _route(raw_path: str) -> tuple[str, list[str]]:
    """Split the still-encoded path into the package and the remaining decoded segments."""
    path = raw_path.split("?", 1)[0]
    segments = [urllib.parse.unquote(s) for s in path[len(_API_PREFIX) :].split("/")]
    return segments[0], segments[1:]


async def _api(request: web.Request) -> web.Response:
    state = request.app[PLAY_STATE]
    package, rest = _route(request.raw_path)
    state.requests.append((request.method, request.raw_path))
    method = request.method
    operation = "unknown"
    try:
        if rest[:2] == ["purchases", "voidedpurchases"] and len(rest) == 2 and method == "GET":
            operation = "voided"
        elif len(rest) == 4 and rest[:3] == ["purchases", "productsv2", "tokens"] and method == "GET":
            operation = "getv2"
        elif len(rest) == 5 and rest[:2] == ["purchases", "products"] and rest[3] == "tokens":
            token = rest[4]
            if method == "GET":
                operation = "get"
            elif method == "POST" and token.endswith(":consume"):
                operation = "consume"
            elif method == "POST" and token.endswith(":acknowledge"):
                operation = "acknowledge"
        if operation == "unknown":
            raise GoogleApiError(404, "notFound", "Requested entity was not found.", domain="global")
        state.check_access(request.headers.get("Authorization"))
        fault = state.take_fault(operation)
        if fault is not None:
            if fault.delay_seconds:
                await asyncio.sleep(fault.delay_seconds)
            if fault.status:
                raise _fault_error(fault.status, fault.reason)
        if operation == "voided":
            return web.json_response(state.list_voided(package, dict(request.query)))
        if operation == "getv2":
            return web.json_response(state.lookup(package, rest[3]).v2())
        product_id = rest[2]
        if operation == "get":
            return web.json_response(state.lookup_product(package, product_id, rest[4]).v1())
        token = rest[4].rsplit(":", 1)[0]
        if operation == "consume":
            state.consume(package, product_id, token)
        else:
            payload = ""
            if request.can_read_body:
                try:
                    data = await request.json()
                except ValueError:
                    raise GoogleApiError(400, "parseError", "Parse Error", domain="global") from None
                payload = str((data or {}).get("developerPayload", ""))
            state.acknowledge(package, product_id, token, payload)
        return web.Response(status=204)
    except GoogleApiError as exc:
        return exc.response()


async def _token(request: web.Request) -> web.Response:
    state = request.app[PLAY_STATE]
    form = await request.post()
    fault = state.take_fault("token")
    if fault is not None:
        if fault.delay_seconds:
            await asyncio.sleep(fault.delay_seconds)
        if fault.status:
            return web.json_response({"error": "internal_failure"}, status=fault.status)
    if form.get("grant_type") != JWT_BEARER:
        return web.json_response(
            {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}, status=400
        )
    try:
        access_token = state.issue_access_token(
            str(form.get("assertion", "")), f"{request.scheme}://{request.host}/token"
        )
    except OAuthError as exc:
        return web.json_response({"error": exc.error, "error_description": exc.description}, status=400)
    return web.json_response({"access_token": access_token, "expires_in": ACCESS_TOKEN_SECONDS, "token_type": "Bearer"})


# --- control endpoints -----------------------------------------------------------


def _purchase_json(purchase: PlayPurchase) -> dict[str, Any]:
    return {
        "purchaseToken": purchase.token,
        "packageName": purchase.package_name,
        "productId": purchase.product_id,
        "orderId": purchase.order_id,
        "state": purchase.state,
        "quantity": purchase.quantity,
        "refundableQuantity": purchase.refundable_quantity,
        "consumed": purchase.consumed,
        "acknowledged": purchase.acknowledged,
        "consumeCalls": purchase.consume_calls,
        "test": purchase.test,
        "regionCode": purchase.region_code,
        "obfuscatedAccountId": purchase.obfuscated_account_id,
    }


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


async def _sim_buy(request: web.Request) -> web.Response:
    data = await _json_body(request)
    product_id = data.get("productId")
    if not isinstance(product_id, str) or not product_id:
        raise web.HTTPBadRequest(text="productId is required")
    try:
        purchase = request.app[PLAY_STATE].buy(
            product_id,
            account_id=data.get("obfuscatedAccountId"),
            profile_id=data.get("obfuscatedProfileId"),
            package_name=data.get("packageName"),
            quantity=int(data.get("quantity", 1)),
            pending=bool(data.get("pending", False)),
            test=bool(data.get("test", False)),
            region_code=str(data.get("regionCode", "US")),
        )
    except (TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return web.json_response(_purchase_json(purchase), status=201)


async def _sim_purchase(request: web.Request) -> web.Response:
    state = request.app[PLAY_STATE]
    token = request.match_info["token"]
    action = request.match_info.get("action", "")
    try:
        if request.method == "GET":
            purchase = state.get(token)
            if purchase is None:
                raise KeyError(token)
            return web.json_response(_purchase_json(purchase))
        if action == "complete":
            purchase = state.complete(token)
        elif action == "cancel":
            purchase = state.cancel(token)
        elif action == "expire":
            purchase = state.expire(token)
        elif action == "refund":
            data = await _json_body(request)
            quantity = data.get("quantity")
            record = state.refund(
                token,
                None if quantity is None else int(quantity),
                reason=int(data.get("reason", REASON_REMORSE)),
                source=int(data.get("source", SOURCE_USER)),
            )
            return web.json_response(record.body())
        else:
            raise web.HTTPNotFound()
    except KeyError:
        raise web.HTTPNotFound(text="no such purchase token") from None
    except ValueError as exc:
        raise web.HTTPConflict(text=str(exc)) from None
    return web.json_response(_purchase_json(purchase))


async def _sim_faults(request: web.Request) -> web.Response:
    state = request.app[PLAY_STATE]
    if request.method == "DELETE":
        state.clear_faults()
        return web.Response(status=204)
    data = await _json_body(request)
    try:
        fault = Fault(
            operation=str(data.get("operation", "*")),
            status=int(data.get("status", 0)),
            count=int(data.get("count", 1)),
            delay_seconds=float(data.get("delaySeconds", 0)),
            reason=str(data.get("reason", "")),
        )
    except (TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    state.inject(fault)
    return web.Response(status=204)


async def _sim_service_account(request: web.Request) -> web.Response:
    state = request.app[PLAY_STATE]
    base = f"{request.scheme}://{request.host}"
    return web.json_response(state.service_account_info(base))


def setup(app: web.Application, settings: StoresimSettings) -> None:
    """Add this stand-in's routes to the simulator and write the service-account key file."""
    state = PlayState(settings.state_dir)
    app[PLAY_STATE] = state
    if settings.port:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host  # noqa: S104
        state.write_service_account(f"{settings.scheme}://{host}:{settings.port}")
    app.router.add_route("*", "/androidpublisher/v3/applications/{tail:.*}", _api)
    app.router.add_post("/token", _token)
    app.router.add_post("/google/sim/purchases", _sim_buy)
    app.router.add_get("/google/sim/purchases/{token}", _sim_purchase)
    app.router.add_post("/google/sim/purchases/{token}/{action}", _sim_purchase)
    app.router.add_post("/google/sim/faults", _sim_faults)
    app.router.add_delete("/google/sim/faults", _sim_faults)
    app.router.add_get("/google/sim/service-account.json", _sim_service_account)
