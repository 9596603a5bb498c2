"""PayPal Payouts adapter (payments.payouts-batch/v1): OAuth2 client credentials,
POST /v1/payments/payouts, batch status with paging, unclaimed-item cancel.

Exactly once at PayPal: our submission id is ``sender_batch_id``. A 5xx or a
timeout is retried with the same id; a "duplicate sender_batch_id" answer means
PayPal already has the batch, so we follow its HATEOAS link instead of paying again.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from services.common.catalog import from_minor
from services.common.outbound import OutboundPolicy
from services.payouts.domain.model import PayoutLine
from services.payouts.domain.ports import (
    ItemOutcome,
    ProviderAmbiguous,
    ProviderBatch,
    ProviderItem,
    ProviderRejected,
    ProviderUnavailable,
)

log = logging.getLogger(__name__)

MAX_ITEMS = 15_000
PAGE_SIZE = 1000
# Renew the access token this long before PayPal says it expires.
TOKEN_MARGIN_SECONDS = 60.0
_BATCH_LINK = re.compile(r"/v1/payments/payouts/([A-Za-z0-9_-]+)")

_OUTCOMES = {
    "SUCCESS": ItemOutcome.PAID,
    "FAILED": ItemOutcome.FAILED,
    "RETURNED": ItemOutcome.FAILED,
    "BLOCKED": ItemOutcome.FAILED,
    "REFUNDED": ItemOutcome.FAILED,
    "REVERSED": ItemOutcome.FAILED,
    "DENIED": ItemOutcome.FAILED,
    "CANCELED": ItemOutcome.FAILED,
    "UNCLAIMED": ItemOutcome.UNCLAIMED,
}


class PayPalProvider:
    name = "paypal"
    max_items_per_submission = MAX_ITEMS

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        timeout_seconds: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        outbound: OutboundPolicy | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._client_id = client_id
        self._secret = client_secret
        self._http = (outbound or OutboundPolicy()).client(timeout_seconds)
        self._monotonic = monotonic
        self._token = ""
        self._token_expires = 0.0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    # -- OAuth2 ----------------------------------------------------------------------------------------

    def _access_token(self, renew: bool = False) -> str:
        with self._lock:
            if not renew and self._token and self._monotonic() < self._token_expires:
                return self._token
            try:
                response = self._http.post(
                    f"{self._base}/v1/oauth2/token",
                    auth=(self._client_id, self._secret),
                    data={"grant_type": "client_credentials"},
                    headers={"Accept": "application/json"},
                )
            except httpx.HTTPError as exc:
                raise ProviderUnavailable(f"PayPal OAuth unreachable: {exc}") from None
            if response.status_code >= 500 or response.status_code == 429:
                raise ProviderUnavailable(f"PayPal OAuth answered {response.status_code}")
            if response.status_code != 200:
                # Our credentials, not the payout: an earlier submission of this batch may
                # already be paying, so failing its items could pay them twice. Retry and alert.
                raise ProviderUnavailable(
                    f"PayPal refused our client credentials (fix COINSTORE_PAYPAL_*): {response.text[:200]}"
                )
            body = response.json()
            self._token = str(body["access_token"])
            self._token_expires = self._monotonic() + max(0.0, float(body.get("expires_in", 0)) - TOKEN_MARGIN_SECONDS)
            return self._token

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self._access_token(renew=attempt > 0)}", **kwargs.pop("headers", {})}
            try:
                response = self._http.request(method, f"{self._base}{path}", headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                raise ProviderUnavailable(f"PayPal {method} {path}: {type(exc).__name__} {exc}") from None
            if response.status_code == 401 and attempt == 0:
                kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            if response.status_code >= 500 or response.status_code == 429:
                raise ProviderUnavailable(
                    f"PayPal {method} {path} answered {response.status_code}: {response.text[:200]}"
                )
            return response
        raise ProviderUnavailable("PayPal kept refusing a fresh access token")

    # -- payouts ---------------------------------------------------------------------------------------

    def submit(self, sender_batch_id: str, lines: Sequence[PayoutLine]) -> str:
        if not 0 < len(lines) <= MAX_ITEMS:
            raise ValueError(f"a PayPal payout carries 1 to {MAX_ITEMS} items, not {len(lines)}")
        body = {
            "sender_batch_header": {
                "sender_batch_id": sender_batch_id,
                "recipient_type": "EMAIL",
                "email_subject": "You have a payout from coinstore",
                "email_message": "Your diamonds were cashed out.",
            },
            "items": [
                {
                    "recipient_type": "EMAIL",
                    "amount": {"value": from_minor(line.amount_minor, line.currency), "currency": line.currency},
                    "receiver": line.receiver,
                    "sender_item_id": line.sender_item_id,
                    "note": "coinstore creator payout",
                    "recipient_wallet": "PAYPAL",
                }
                for line in lines
            ],
        }
        response = self._call(
            "POST",
            "/v1/payments/payouts",
            json=body,
            headers={"Content-Type": "application/json"},
        )
        if response.status_code in (200, 201):
            return str(response.json()["batch_header"]["payout_batch_id"])
        error = _json(response)
        if _is_duplicate(error):
            original = _batch_link(error)
            if original is None:
                raise ProviderAmbiguous(
                    f"PayPal says {sender_batch_id} exists but links no batch: {response.text[:300]}"
                )
            log.info("PayPal already has sender_batch_id %s as %s; not paying again", sender_batch_id, original)
            return original
        if response.status_code in (401, 403):
            raise ProviderUnavailable(f"PayPal refused our authorization for payouts: {response.text[:300]}")
        raise ProviderRejected(str(error.get("name") or f"HTTP_{response.status_code}"), response.text[:500])

    def batch(self, provider_batch_id: str) -> ProviderBatch:
        items: list[ProviderItem] = []
        status = ""
        page = 1
        while True:
            response = self._call(
                "GET",
                f"/v1/payments/payouts/{provider_batch_id}",
                params={"page": page, "page_size": PAGE_SIZE, "total_required": "true"},
            )
            if response.status_code != 200:
                raise ProviderUnavailable(f"PayPal batch {provider_batch_id} answered {response.status_code}")
            body = response.json()
            header = body.get("batch_header", {})
            status = str(header.get("batch_status", ""))
            page_items = body.get("items") or []
            items.extend(_item(raw) for raw in page_items)
            total_pages = body.get("total_page")
            has_next = any(link.get("rel") == "next" for link in body.get("links") or [])
            if (
                not page_items
                or (total_pages is not None and page >= int(total_pages))
                or (total_pages is None and not has_next)
            ):
                break
            page += 1
        return ProviderBatch(provider_batch_id, status, status == "DENIED", tuple(items))

    def cancel_unclaimed(self, provider_item_id: str) -> bool:
        response = self._call("POST", f"/v1/payments/payouts-item/{provider_item_id}/cancel", json={})
        if response.status_code == 200:
            return str(_json(response).get("transaction_status", "")) == "RETURNED"
        return False


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key, inner
            yield from _walk(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner)


def _is_duplicate(error: dict[str, Any]) -> bool:
    text = json.dumps(error).lower()
    return "sender_batch_id" in text and ("already" in text or "duplicate" in text)


def _batch_link(error: dict[str, Any]) -> str | None:
    for key, value in _walk(error):
        if key == "href" and isinstance(value, str):
            match = _BATCH_LINK.search(value)
            if match:
                return match.group(1)
    return None


def _item(raw: dict[str, Any]) -> ProviderItem:
    status = str(raw.get("transaction_status", ""))
    errors = raw.get("errors") or {}
    reason = str(errors.get("name") or "") if isinstance(errors, dict) else ""
    return ProviderItem(
        sender_item_id=str((raw.get("payout_item") or {}).get("sender_item_id", "")),
        provider_item_id=str(raw.get("payout_item_id", "")),
        transaction_id=str(raw.get("transaction_id", "") or ""),
        outcome=_OUTCOMES.get(status, ItemOutcome.PENDING),
        status=status,
        reason=reason or status,
    )
