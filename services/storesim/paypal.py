"""PayPal Payouts stand-in of the store simulator (REST, payments.payouts-batch/v1).

Speaks PayPal's wire format: OAuth2 client credentials at ``/paypal/v1/oauth2/token``,
``POST /paypal/v1/payments/payouts`` (up to 15,000 items; a ``sender_batch_id`` used
before is refused with USER_BUSINESS_ERROR and a HATEOAS link to the original),
``GET …/payouts/{payout_batch_id}`` with paging, ``GET …/payouts-item/{id}`` and
``POST …/payouts-item/{id}/cancel`` (UNCLAIMED items only).

It records every payment it makes; tests read them at ``GET /paypal/sim/payments``
and inject faults with ``POST /paypal/sim/faults``:

``submit_errors``        the next N payouts answer 500 without paying
``submit_timeouts``      the next N payouts pay, then stall ``stall_seconds`` before answering
``status_errors``        the next N batch/item reads answer 503
``resubmit_rejections``  the next N re-submissions of a known sender_batch_id answer a plain 422
``duplicates_without_link``  the next N duplicate answers carry no link to the original batch
``final_delay_seconds``  items stay PENDING this long after they were paid
``receiver_outcomes``    {receiver: "FAILED" | "UNCLAIMED" | "RETURNED" | "BLOCKED" | … [":ERROR_NAME"]}

``POST /paypal/sim/reset`` forgets everything. The state lives in this process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from services.storesim.config import StoresimSettings

PREFIX = "/paypal"
MAX_ITEMS = 15_000
MAX_PAGE_SIZE = 1000
TOKEN_SECONDS = 32_400
SCOPE = "https://uri.paypal.com/services/payments/payouts https://uri.paypal.com/services/payments/realtimepayment"
DEFAULT_CLIENTS = {"coinstore-dev": "coinstore-dev-secret"}
INFO_LINK = "https://developer.paypal.com/docs/api/payments.payouts-batch/#errors"
_DEFAULT_ERRORS = {
    "FAILED": "RECEIVER_ACCOUNT_LOCKED",
    "UNCLAIMED": "RECEIVER_UNREGISTERED",
    "RETURNED": "RECEIVER_REFUSED",
    "BLOCKED": "RISK_DECLINE",
    "REFUNDED": "REFUNDED",
    "REVERSED": "REVERSED",
    "ONHOLD": "PENDING_RECIPIENT_NON_HOLDING_CURRENCY_PAYMENT_PREFERENCE",
}
_AMOUNT = re.compile(r"^\d{1,10}(\.\d{1,2})?$")


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _paypal_id(length: int = 13) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass
class Item:
    payout_item_id: str
    transaction_id: str
    activity_id: str
    payout_batch_id: str
    sender_batch_id: str
    payout_item: dict[str, Any]
    paid_at: float
    outcome: str
    error_name: str
    time_processed: str
    cancelled: bool = False


@dataclass
class Batch:
    payout_batch_id: str
    sender_batch_header: dict[str, Any]
    item_ids: list[str]
    time_created: str
    currency: str
    total: Decimal


@dataclass
class Faults:
    submit_errors: int = 0
    submit_timeouts: int = 0
    stall_seconds: float = 30.0
    status_errors: int = 0
    final_delay_seconds: float = 0.0
    # Answers to re-submissions of a known sender_batch_id that prove nothing: a plain 422
    # refusal, or a "duplicate" error without the link to the original batch.
    resubmit_rejections: int = 0
    duplicates_without_link: int = 0
    receiver_outcomes: dict[str, str] = field(default_factory=dict)


class PayPalSim:
    def __init__(self) -> None:
        self.clients = dict(DEFAULT_CLIENTS)
        self.reset()

    def reset(self) -> None:
        self.tokens: dict[str, float] = {}
        self.batches: dict[str, Batch] = {}
        self.by_sender: dict[str, str] = {}
        self.items: dict[str, Item] = {}
        self.faults = Faults()
        self.submissions = 0
        self.duplicates = 0

    def status(self, item: Item) -> str:
        if item.cancelled:
            return "RETURNED"
        if time.monotonic() < item.paid_at + self.faults.final_delay_seconds:
            return "PENDING"
        return item.outcome


SIM = web.AppKey("paypal_sim", PayPalSim)


def _error(
    status: int, name: str, message: str, details: list[dict[str, Any]] | None = None, **extra: Any
) -> web.Response:
    body: dict[str, Any] = {
        "name": name,
        "message": message,
        "debug_id": uuid.uuid4().hex[:13],
        "information_link": INFO_LINK,
    }
    if details:
        body["details"] = details
    body.update(extra)
    return web.json_response(body, status=status)


def _base(request: web.Request) -> str:
    return f"{request.url.origin()}{PREFIX}"


def _authorized(request: web.Request) -> bool:
    sim = request.app[SIM]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expires = sim.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
    return expires is not None and expires > time.monotonic()


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "invalid_token", "error_description": "Token signature verification failed"}, status=401
    )


async def oauth_token(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    client_id = secret = ""
    if scheme.lower() == "basic":
        try:
            client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            client_id = ""
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return web.json_response(
            {"error": "unsupported_grant_type", "error_description": "Grant Type is NULL or unsupported"}, status=400
        )
    if not client_id or sim.clients.get(client_id) != secret:
        return web.json_response(
            {"error": "invalid_client", "error_description": "Client Authentication failed"}, status=401
        )
    token = "A21AA" + secrets.token_urlsafe(40)
    sim.tokens[token] = time.monotonic() + TOKEN_SECONDS
    return web.json_response(
        {
            "scope": SCOPE,
            "access_token": token,
            "token_type": "Bearer",
            "app_id": "APP-80W284485P519543T",
            "expires_in": TOKEN_SECONDS,
            "nonce": f"{_now_text()}{secrets.token_hex(8)}",
        }
    )


def _validation(field_name: str, issue: str) -> web.Response:
    return _error(
        400,
        "VALIDATION_ERROR",
        "Invalid request - see details",
        [{"field": field_name, "location": "body", "issue": issue}],
    )


def _batch_links(base: str, payout_batch_id: str) -> list[dict[str, str]]:
    return [
        {
            "href": f"{base}/v1/payments/payouts/{payout_batch_id}",
            "rel": "self",
            "method": "GET",
            "encType": "application/json",
        }
    ]


async def create_payout(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    if not _authorized(request):
        return _unauthorized()
    sim.submissions += 1
    if sim.faults.submit_errors > 0:
        sim.faults.submit_errors -= 1
        return _error(500, "INTERNAL_SERVICE_ERROR", "An internal service error has occurred.")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "MALFORMED_REQUEST", "Incoming JSON request does not map to API request")
    header = body.get("sender_batch_header") if isinstance(body, dict) else None
    if not isinstance(header, dict):
        return _validation("sender_batch_header", "Required field is missing")
    sender_batch_id = header.get("sender_batch_id")
    if not isinstance(sender_batch_id, str) or not 0 < len(sender_batch_id) <= 256:
        return _validation("sender_batch_header.sender_batch_id", "Value is invalid")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return _validation("items", "Required field is missing")
    if len(items) > MAX_ITEMS:
        return _validation("items", f"Batch size exceeds the maximum of {MAX_ITEMS} items")
    existing = sim.by_sender.get(sender_batch_id)
    if existing is not None:
        sim.duplicates += 1
        if sim.faults.resubmit_rejections > 0:
            sim.faults.resubmit_rejections -= 1
            return _error(422, "UNPROCESSABLE_ENTITY", "The requested action could not be performed.")
        links = _batch_links(_base(request), existing)
        if sim.faults.duplicates_without_link > 0:
            sim.faults.duplicates_without_link -= 1
            links = []
        return _error(
            400,
            "USER_BUSINESS_ERROR",
            "User business error.",
            [
                {
                    "field": "SENDER_BATCH_ID",
                    "location": "body",
                    "issue": f"Batch with given sender_batch_id {sender_batch_id} already exists",
                    "link": links,
                }
            ],
            links=links,
        )
    currency = ""
    total = Decimal(0)
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if not isinstance(item, dict):
            return _validation(where, "Value is invalid")
        amount = item.get("amount")
        if (
            not isinstance(amount, dict)
            or not isinstance(amount.get("value"), str)
            or not _AMOUNT.match(amount["value"])
        ):
            return _validation(f"{where}.amount.value", "Value is invalid")
        code = amount.get("currency")
        if not isinstance(code, str) or not re.fullmatch(r"[A-Z]{3}", code):
            return _validation(f"{where}.amount.currency", "Value is invalid")
        if Decimal(amount["value"]) <= 0:
            return _validation(f"{where}.amount.value", "Value must be greater than zero")
        if not isinstance(item.get("receiver"), str) or not item["receiver"]:
            return _validation(f"{where}.receiver", "Required field is missing")
        currency = currency or code
        try:
            total += Decimal(amount["value"])
        except InvalidOperation:
            return _validation(f"{where}.amount.value", "Value is invalid")
    payout_batch_id = _paypal_id()
    recipient_type = str(header.get("recipient_type", "EMAIL"))
    now = time.monotonic()
    ids: list[str] = []
    for item in items:
        rule = sim.faults.receiver_outcomes.get(item["receiver"], "SUCCESS")
        outcome, _, error_name = rule.partition(":")
        payout_item = {
            "recipient_type": str(item.get("recipient_type", recipient_type)).upper(),
            "amount": {"currency": item["amount"]["currency"], "value": item["amount"]["value"]},
            "note": item.get("note", ""),
            "receiver": item["receiver"],
            "sender_item_id": str(item.get("sender_item_id", "")),
            "recipient_wallet": item.get("recipient_wallet", "PAYPAL"),
        }
        record = Item(
            payout_item_id=_paypal_id(),
            transaction_id=_paypal_id(17),
            activity_id=_paypal_id(17),
            payout_batch_id=payout_batch_id,
            sender_batch_id=sender_batch_id,
            payout_item=payout_item,
            paid_at=now,
            outcome=outcome.upper(),
            error_name=error_name or _DEFAULT_ERRORS.get(outcome.upper(), ""),
            time_processed=_now_text(),
        )
        sim.items[record.payout_item_id] = record
        ids.append(record.payout_item_id)
    sim.batches[payout_batch_id] = Batch(payout_batch_id, dict(header), ids, _now_text(), currency, total)
    sim.by_sender[sender_batch_id] = payout_batch_id
    if sim.faults.submit_timeouts > 0:
        sim.faults.submit_timeouts -= 1
        # Paid, but the answer never arrives in time: the caller times out.
        await asyncio.sleep(sim.faults.stall_seconds)
    return web.json_response(
        {
            "batch_header": {
                "payout_batch_id": payout_batch_id,
                "batch_status": "PENDING",
                "sender_batch_header": dict(header),
            },
            "links": _batch_links(_base(request), payout_batch_id),
        },
        status=201,
    )


def _item_json(sim: PayPalSim, item: Item, base: str) -> dict[str, Any]:
    status = sim.status(item)
    body: dict[str, Any] = {
        "payout_item_id": item.payout_item_id,
        "transaction_status": status,
        "payout_item_fee": {"currency": item.payout_item["amount"]["currency"], "value": "0.00"},
        "payout_batch_id": item.payout_batch_id,
        "payout_item": item.payout_item,
        "links": [
            {
                "href": f"{base}/v1/payments/payouts-item/{item.payout_item_id}",
                "rel": "item",
                "method": "GET",
                "encType": "application/json",
            }
        ],
    }
    if status != "PENDING":
        body["transaction_id"] = item.transaction_id
        body["activity_id"] = item.activity_id
        body["time_processed"] = item.time_processed
    if status not in ("PENDING", "SUCCESS") and item.error_name:
        body["errors"] = {
            "name": "RECEIVER_REFUSED" if item.cancelled else item.error_name,
            "message": f"The payout item is {status.lower()}.",
            "information_link": INFO_LINK,
        }
    return body


def _read_fault(sim: PayPalSim) -> web.Response | None:
    if sim.faults.status_errors > 0:
        sim.faults.status_errors -= 1
        return _error(503, "SERVICE_UNAVAILABLE", "Service Unavailable.")
    return None


def _int(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < 1:
        details = [{"field": name, "location": "query", "issue": "Value is invalid"}]
        body = {"name": "VALIDATION_ERROR", "message": "Invalid request - see details", "details": details}
        raise web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")
    return int(raw)


async def get_payout(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    if not _authorized(request):
        return _unauthorized()
    fault = _read_fault(sim)
    if fault is not None:
        return fault
    batch = sim.batches.get(request.match_info["payout_batch_id"])
    if batch is None:
        return _error(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.")
    page = _int(request.query.get("page"), 1, "page")
    page_size = min(_int(request.query.get("page_size"), MAX_PAGE_SIZE, "page_size"), MAX_PAGE_SIZE)
    total_required = request.query.get("total_required", "false").lower() == "true"
    base = _base(request)
    items = [sim.items[i] for i in batch.item_ids]
    statuses = [sim.status(i) for i in items]
    pending = any(s in ("PENDING", "ONHOLD") for s in statuses)
    start = (page - 1) * page_size
    page_items = [_item_json(sim, i, base) for i in items[start : start + page_size]]
    total_pages = max(1, -(-len(items) // page_size))
    self_href = f"{base}/v1/payments/payouts/{batch.payout_batch_id}?page_size={page_size}&page={page}"
    links = [{"href": self_href, "rel": "self", "method": "GET", "encType": "application/json"}]
    if page < total_pages:
        links.append(
            {
                "href": f"{base}/v1/payments/payouts/{batch.payout_batch_id}?page_size={page_size}&page={page + 1}",
                "rel": "next",
                "method": "GET",
                "encType": "application/json",
            }
        )
    if page > 1:
        links.append(
            {
                "href": f"{base}/v1/payments/payouts/{batch.payout_batch_id}?page_size={page_size}&page={page - 1}",
                "rel": "previous",
                "method": "GET",
                "encType": "application/json",
            }
        )
    header: dict[str, Any] = {
        "payout_batch_id": batch.payout_batch_id,
        "batch_status": "PROCESSING" if pending else "SUCCESS",
        "time_created": batch.time_created,
        "sender_batch_header": batch.sender_batch_header,
        "funding_source": "BALANCE",
        "amount": {"currency": batch.currency, "value": str(batch.total)},
        "fees": {"currency": batch.currency, "value": "0.00"},
    }
    if not pending:
        header["time_completed"] = batch.time_created
    body: dict[str, Any] = {"batch_header": header, "items": page_items, "links": links}
    if total_required:
        body["total_items"] = len(items)
        body["total_page"] = total_pages
    return web.json_response(body)


async def get_item(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    if not _authorized(request):
        return _unauthorized()
    fault = _read_fault(sim)
    if fault is not None:
        return fault
    item = sim.items.get(request.match_info["payout_item_id"])
    if item is None:
        return _error(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.")
    return web.json_response(_item_json(sim, item, _base(request)))


async def cancel_item(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    if not _authorized(request):
        return _unauthorized()
    item = sim.items.get(request.match_info["payout_item_id"])
    if item is None:
        return _error(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.")
    if sim.status(item) != "UNCLAIMED":
        return _error(
            400,
            "ITEM_ALREADY_CANCELLED" if item.cancelled else "ITEM_CANCELLATION_FAILED",
            "Only unclaimed payout items can be cancelled.",
        )
    item.cancelled = True
    return web.json_response(_item_json(sim, item, _base(request)))


async def sim_payments(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    payments = [
        {
            "payout_batch_id": item.payout_batch_id,
            "sender_batch_id": item.sender_batch_id,
            "sender_item_id": item.payout_item["sender_item_id"],
            "payout_item_id": item.payout_item_id,
            "receiver": item.payout_item["receiver"],
            "amount": item.payout_item["amount"],
            "transaction_status": sim.status(item),
        }
        for item in sim.items.values()
    ]
    return web.json_response(
        {
            "payments": payments,
            "submissions": sim.submissions,
            "duplicates": sim.duplicates,
            "batches": len(sim.batches),
        }
    )


async def sim_faults(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await request.json()
    faults = sim.faults
    for name in ("submit_errors", "submit_timeouts", "status_errors", "resubmit_rejections", "duplicates_without_link"):
        if name in body:
            setattr(faults, name, int(body[name]))
    for name in ("stall_seconds", "final_delay_seconds"):
        if name in body:
            setattr(faults, name, float(body[name]))
    if "receiver_outcomes" in body:
        faults.receiver_outcomes.update({str(k): str(v) for k, v in body["receiver_outcomes"].items()})
    if "clients" in body:
        sim.clients.update({str(k): str(v) for k, v in body["clients"].items()})
    return web.json_response({"ok": True})


async def sim_reset(request: web.Request) -> web.Response:
    request.app[SIM].reset()
    return web.json_response({"ok": True})


def setup(app: web.Application, settings: StoresimSettings) -> None:
    """Add this stand-in's routes to the simulator."""
    app[SIM] = PayPalSim()
    app.router.add_post(f"{PREFIX}/v1/oauth2/token", oauth_token)
    app.router.add_post(f"{PREFIX}/v1/payments/payouts", create_payout)
    app.router.add_get(f"{PREFIX}/v1/payments/payouts/{{payout_batch_id}}", get_payout)
    app.router.add_get(f"{PREFIX}/v1/payments/payouts-item/{{payout_item_id}}", get_item)
    app.router.add_post(f"{PREFIX}/v1/payments/payouts-item/{{payout_item_id}}/cancel", cancel_item)
    app.router.add_get(f"{PREFIX}/sim/payments", sim_payments)
    app.router.add_post(f"{PREFIX}/sim/faults", sim_faults)
    app.router.add_post(f"{PREFIX}/sim/reset", sim_reset)
