"""The system scenarios as plain functions of a running system and a seeded random
source, so the pytest suite and the soak (``python -m tests.system.soak``) run the
same code. Each returns what it proved, for the soak's summary."""

from __future__ import annotations

import json
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from coinstore.payouts.v1 import payout_service_pb2 as ppb
from coinstore.receipts.v1 import receipt_service_pb2 as rpb
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from services.common.db import normalize_url
from tests.support.descriptors import Rpc, all_rpcs, request_bytes
from tests.support.failpoints import fired_pid
from tests.support.faultproxy import Mode, fault_proxy
from tests.support.status import error_info
from tests.system.harness import SERVICES, System, SystemFailure, http_status, wait_drained, wait_until

APPLE_PACKS = {"com.coinstore.coins.70": 70, "com.coinstore.coins.350": 350, "com.coinstore.coins.1400": 1400}
PLAY_PACKS = {"coins_70": 70, "coins_350": 350, "coins_1400": 1400}
BIG_PACKS = {"apple": "com.coinstore.coins.7000", "play": "coins_7000"}
COINS = {**APPLE_PACKS, **PLAY_PACKS, BIG_PACKS["apple"]: 7000, BIG_PACKS["play"]: 7000}
REPORTS_PER_PATH = 5
STORM_THREADS = 24


@dataclass
class Proof:
    """What a scenario established, added up by the soak."""

    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)

    def add(self, other: Proof) -> None:
        self.operations.update(other.operations)
        self.faults.update(other.faults)


@dataclass(frozen=True)
class Purchase:
    store: str  # "apple" or "play"
    account: str
    product: str
    coins: int
    transaction_id: str  # Apple transaction id or Play purchase token
    signed: str = ""  # Apple signedTransaction


def inbox_counts(system: System) -> dict[str, int]:
    """`coinstore_notifications_inbox{state}` from the receipts metrics port."""
    url = f"http://127.0.0.1:{system.port('RECEIPTS_METRICS_PORT')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'^coinstore_notifications_inbox\{state="(\w+)"\} (\S+)$', text, re.MULTILINE)
    }


def bind(system: System, accounts: list[str]) -> dict[str, rpb.GetPurchaseBindingResponse]:
    stub, metadata = system.receipts(), system.metadata("purchases:verify")
    return {
        a: stub.GetPurchaseBinding(rpb.GetPurchaseBindingRequest(account_id=a), metadata=metadata, timeout=30)
        for a in accounts
    }


def buy_one(
    system: System, store: str, account: str, product: str, binding: rpb.GetPurchaseBindingResponse
) -> Purchase:
    """One Production purchase of ``product`` in the simulator, as the device makes it."""
    if store == "apple":
        reply = system.sim("/apple/buy", {"productId": product, "appAccountToken": binding.app_account_token})
        coins = {**APPLE_PACKS, BIG_PACKS["apple"]: 7000}[product]
        return Purchase(store, account, product, coins, str(reply["transactionId"]), reply["signedTransaction"])
    reply = system.sim(
        "/google/sim/purchases", {"productId": product, "obfuscatedAccountId": binding.obfuscated_account_id}
    )
    return Purchase(
        store, account, product, {**PLAY_PACKS, BIG_PACKS["play"]: 7000}[product], str(reply["purchaseToken"])
    )


def buy(system: System, rng: random.Random, accounts: list[str], count: int) -> list[Purchase]:
    """``count`` Production purchases in the simulator, each for a random account and
    store; the simulator's own notifications of them are lost on purpose, so the
    storm decides when each report arrives."""
    bindings = bind(system, accounts)
    stores = [rng.choice(("apple", "play")) for _ in range(count)]
    system.sim("/apple/notifications/config", {"auto": False})
    system.sim("/pubsub/control/config", {"lose_next": stores.count("play")})
    try:
        purchases = []
        for store in stores:
            account = rng.choice(accounts)
            product = rng.choice(sorted(APPLE_PACKS if store == "apple" else PLAY_PACKS))
            purchases.append(buy_one(system, store, account, product, bindings[account]))
    finally:
        system.sim("/apple/notifications/config", {"auto": True})
        system.sim("/pubsub/control/config", {"lose_next": 0})
    return purchases


def app_report(system: System, purchase: Purchase, attempt: int, timeout: float = 60) -> Callable[[], int]:
    """VerifyApplePurchase / VerifyGooglePurchase as the app backend calls it; returns the PurchaseState."""
    stub, metadata = system.receipts(), system.metadata("purchases:verify")
    request_id = f"storm-{purchase.transaction_id[:40]}-{attempt}"

    def report() -> int:
        if purchase.store == "apple":
            apple = stub.VerifyApplePurchase(
                rpb.VerifyApplePurchaseRequest(
                    request_id=request_id, account_id=purchase.account, signed_transaction=purchase.signed
                ),
                metadata=metadata,
                timeout=timeout,
            )
            return int(apple.purchases[0].state)
        play = stub.VerifyGooglePurchase(
            rpb.VerifyGooglePurchaseRequest(
                request_id=request_id,
                account_id=purchase.account,
                product_id=purchase.product,
                purchase_token=purchase.transaction_id,
            ),
            metadata=metadata,
            timeout=timeout,
        )
        return int(play.purchase.state)

    return report


def store_report(system: System, purchase: Purchase) -> Callable[[], int]:
    """A new store notification of the purchase (its own notificationUUID / messageId)."""

    def report() -> int:
        if purchase.store == "apple":
            system.sim(
                "/apple/notifications/send",
                {"notificationType": "ONE_TIME_CHARGE", "transactionId": purchase.transaction_id},
            )
        else:
            notification = {
                "version": "1.0",
                "packageName": "com.coinstore.app",
                "oneTimeProductNotification": {
                    "version": "1.0",
                    "notificationType": 1,  # ONE_TIME_PRODUCT_PURCHASED
                    "purchaseToken": purchase.transaction_id,
                    "sku": purchase.product,
                },
            }
            system.sim("/pubsub/control/publish", {"notification": notification})
        return -1

    return report


def expected_coins(purchases: list[Purchase]) -> dict[str, int]:
    coins: Counter[str] = Counter()
    for p in purchases:
        coins[p.account] += p.coins
    return dict(coins)


def wait_notifications(system: System, processed: int, timeout: float) -> None:
    """Until the inbox has processed ``processed`` rows and holds none pending or failed:
    evidence every notification ran, not a guess that they have."""

    def done() -> bool:
        counts = inbox_counts(system)
        return counts.get("processed", 0) >= processed and not counts.get("pending") and not counts.get("failed")

    try:
        wait_until("every store notification processed", done, timeout, interval=0.5)
    except SystemFailure as exc:
        raise SystemFailure(f"{exc}: inbox {inbox_counts(system)}, wanted {processed} processed") from None


def duplicate_storm(system: System, rng: random.Random, purchases_count: int, timeout: float | None = None) -> Proof:
    """Each purchase reported 5 times by the app and 5 times by store notifications,
    all released together in a seeded order: credits = distinct purchases."""
    accounts = [f"storm-{rng.getrandbits(40):010x}" for _ in range(max(2, purchases_count // 10))]
    purchases = buy(system, rng, accounts, purchases_count)
    before = inbox_counts(system).get("processed", 0)
    reports: list[Callable[[], int]] = []
    for purchase in purchases:
        reports += [app_report(system, purchase, i) for i in range(REPORTS_PER_PATH)]
        reports += [store_report(system, purchase) for _ in range(REPORTS_PER_PATH)]
    rng.shuffle(reports)
    with ThreadPoolExecutor(STORM_THREADS) as pool:
        states = list(pool.map(lambda report: report(), reports))
    answered = Counter(states)
    unexpected = set(answered) - {-1, rpb.PURCHASE_STATE_CREDITED, rpb.PURCHASE_STATE_ALREADY_CREDITED}
    if unexpected:
        raise SystemFailure(f"app reports answered {answered}")
    if answered[rpb.PURCHASE_STATE_CREDITED] > len(purchases):
        raise SystemFailure(f"{answered[rpb.PURCHASE_STATE_CREDITED]} app reports say CREDITED for {len(purchases)}")
    wait_notifications(system, before + REPORTS_PER_PATH * len(purchases), timeout or 120 + purchases_count * 0.5)
    check_balances(system, expected_coins(purchases))
    check_credited(system, purchases)
    wait_drained(system, timeout or 120 + purchases_count * 0.5)
    proof = Proof()
    proof.operations.update(
        {"purchases": len(purchases), "app reports": REPORTS_PER_PATH * len(purchases)}
        | {"store notifications": REPORTS_PER_PATH * len(purchases)}
    )
    return proof


def check_balances(system: System, coins: dict[str, int]) -> None:
    have = {a: system.balance(a).coins for a in coins}
    wrong = {a: (have[a], c) for a, c in coins.items() if have[a] != c}
    if wrong:
        raise SystemFailure(f"balances (have, want) differ: {dict(list(wrong.items())[:10])}")


def check_credited(system: System, purchases: list[Purchase]) -> None:
    stub, metadata = system.receipts(), system.metadata("purchases:verify")
    for purchase in purchases:
        store = rpb.STORE_APP_STORE if purchase.store == "apple" else rpb.STORE_GOOGLE_PLAY
        found: Any = stub.GetPurchase(
            rpb.GetPurchaseRequest(store=store, store_transaction_id=purchase.transaction_id),
            metadata=metadata,
            timeout=30,
        ).purchase
        if found.state != rpb.PURCHASE_STATE_CREDITED or found.account_id != purchase.account:
            raise SystemFailure(f"{purchase}: {rpb.PurchaseState.Name(found.state)} for {found.account_id}")


# -- abuse: every RPC and every webhook fuzzed on the wire ------------------------

# Statuses a coinstore RPC may answer (CONVENTIONS.md); never INTERNAL, UNKNOWN, DATA_LOSS.
DOCUMENTED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# What a store's webhook may answer to something it did not sign (README: never 500).
WEBHOOK_REFUSALS = frozenset({400, 401, 403, 413})
MAX_WEBHOOK_BODY = 1024 * 1024
WEBHOOKS = ("/notifications/apple/v2", "/notifications/google")


def _fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def fuzz_rpcs(system: System, seed: int, examples: int) -> Proof:
    """Every RPC of the three services with requests drawn from its descriptor, sent as
    raw bytes with a token holding every scope: only documented statuses, each error
    with its ErrorInfo."""
    metadata = system.metadata(*sorted({rpc.scope for rpc in all_rpcs()}))
    channels = {service: system.channel(service) for service in SERVICES}
    proof = Proof()
    for rpc in all_rpcs():
        _fuzz_rpc(rpc, channels[rpc.path.split(".")[1]], metadata, seed, examples, proof)
    proof.operations["rpcs fuzzed"] = len(list(all_rpcs()))
    return proof


def _fuzz_rpc(
    rpc: Rpc, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], seed: int, examples: int, proof: Proof
) -> None:
    call = channel.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)

    @_fuzz_settings(examples)
    @given(payload=request_bytes(rpc.method.input_type))
    def check(payload: bytes) -> None:
        try:
            call(payload, metadata=metadata, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code not in DOCUMENTED:
                detail = error.details()  # type: ignore[attr-defined]
                raise SystemFailure(f"{rpc.path} answered {code.name}: {detail}") from None
            if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                info = error_info(error)
                if info.domain != "coinstore" or not info.reason:
                    raise SystemFailure(f"{rpc.path} {code.name} without a coinstore ErrorInfo") from None
        proof.operations[f"rpc {code.name}"] += 1

    hypothesis_seed(seed)(check)()


@st.composite
def webhook_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    jwt_like = st.builds(
        lambda a, b, c: f"{a}.{b}.{c}", st.text(max_size=40), st.text(max_size=400), st.text(max_size=90)
    )
    body = draw(
        st.one_of(
            st.binary(max_size=2048),
            st.text(max_size=500).map(str.encode),
            st.builds(lambda p: json.dumps({"signedPayload": p}).encode(), st.one_of(jwt_like, st.integers())),
            st.builds(
                lambda data, mid: json.dumps(
                    {"message": {"data": data, "messageId": mid}, "subscription": "projects/x/subscriptions/y"}
                ).encode(),
                st.one_of(st.text(max_size=200), st.integers()),
                st.one_of(st.text(max_size=20), st.none()),
            ),
            st.sampled_from([b"", b"{}", b"[]", b"null", b'{"signedPayload": null}', b"\x00" * 64]),
            st.integers(1024 * 1024 - 16, 1024 * 1024 + 4096).map(lambda n: b"{" + b" " * n + b"}"),
            st.text(max_size=200).map(lambda t: t.encode("utf-16")),
        )
    )
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", "", "x/y"])
        )
    }
    authorization = draw(st.one_of(st.none(), jwt_like.map(lambda t: f"Bearer {t}"), st.text(max_size=60)))
    if authorization is not None and authorization.isprintable() and authorization.isascii():
        headers["Authorization"] = authorization
    if draw(st.booleans()):
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "identity", "x"]))
    return body, headers


def fuzz_webhooks(system: System, seed: int, examples: int) -> Proof:
    """Both store webhooks with random bodies, headers and encodings: only the
    documented refusals, never a 500."""
    proof = Proof()
    for path in WEBHOOKS:
        _fuzz_webhook(system.webhook_url + path, seed, examples, proof)
    return proof


def _fuzz_webhook(url: str, seed: int, examples: int, proof: Proof) -> None:
    @_fuzz_settings(examples)
    @given(request=webhook_requests())
    def check(request: tuple[bytes, dict[str, str]]) -> None:
        body, headers = request
        status = http_status(url, body, headers)
        if status == 0 and len(body) > MAX_WEBHOOK_BODY:
            status = 413  # refused before it was sent in full: the sender saw the connection close
        if status not in WEBHOOK_REFUSALS:
            raise SystemFailure(f"POST {url} {headers} {body[:200]!r} answered {status}")
        proof.operations[f"webhook {status}"] += 1

    hypothesis_seed(seed)(check)()


def check_serving(system: System) -> None:
    serving = system.serving()
    if not all(serving.values()):
        raise SystemFailure(f"not every service is SERVING after the abuse: {serving}")


# -- crash matrix: processes killed at named failpoints during mixed load ----------

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
# Where each process may die (services/common/failpoints.py); the seed picks one per
# process and the hit it fires on (up to the number given). Workers die with their
# pool (kill-group) on the first hit: each pool process counts its own hits; the
# wallet's group commit makes one hit of a whole batch of gifts or credits.
CRASH_POINTS: dict[str, tuple[tuple[str, int], ...]] = {
    "wallet": (("wallet.credit.before_commit", 1), ("wallet.debit.before_commit", 1)),
    "receipts": (
        ("receipts.credit.before_wallet", 3),
        ("receipts.credit.after_wallet", 3),
        ("receipts.webhook.after_commit", 3),
    ),
    "receipts-worker": (("receipts.notification.after_effect", 1),),
    "payouts-worker": (
        ("payouts.submit.after_provider", 1),
        ("payouts.poll.before_settle", 1),
        ("payouts.settle.after_wallet", 1),
    ),
}


def retrying(what: str, call: Callable[[], Any], timeout: float = 90) -> Any:
    """``call`` until it answers; a dependency that is down (UNAVAILABLE, a deadline, a
    conflict) is retried, anything else fails the scenario."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code not in RETRYABLE:
                raise SystemFailure(f"{what}: {code.name} {error.details()}") from None  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise SystemFailure(f"{what}: still {code.name} after {timeout:.0f}s") from None
            time.sleep(0.3)


class Supervisor:
    """Restarts any process that died (a failpoint fired), as an orchestrator would."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.restarts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.error is not None:
            raise SystemFailure(f"a restart failed: {self.error}")

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.2):
                for name in list(self.system.processes):
                    if self.system.exited(name):
                        self.system.wait_exited(name, 10)
                        self.restarts[name] += 1
                        self.system.start(name)
                        self.system.wait_serving(name)
        except BaseException as exc:  # reported by __exit__
            self.error = exc


def arm_failpoints(system: System, rng: random.Random, targets: tuple[str, ...], directory: Path) -> dict[str, str]:
    """Restart each of ``targets`` with one failpoint armed, chosen by the seed; the
    markers go to ``directory`` (a fresh one per run: each point fires once per directory)."""
    armed = {}
    for name in targets:
        point, most = rng.choice(CRASH_POINTS[name])
        action = "kill-group" if name.endswith("worker") else "kill"
        armed[point] = name
        system.kill(name)
        system.start(name, FAILPOINTS=f"{point}={action}@{rng.randint(1, most)}", FAILPOINTS_DIR=str(directory))
    system.wait_serving(*(n for n in targets if n in SERVICES))
    return armed


def crash_matrix(system: System, rng: random.Random, fans: int = 4, timeout: float = 240) -> Proof:
    """Purchases, gifts, refunds and a payout batch while the wallet, the receipts
    service, the receipts worker and the payouts worker are each killed at a seeded
    failpoint and restarted: every acknowledged credit is there once, every
    acknowledged gift once, no cash-out paid twice at PayPal."""
    proof = Proof()
    markers = system.failpoints_dir / f"run-{rng.getrandbits(32):08x}"
    armed = arm_failpoints(system, rng, tuple(CRASH_POINTS), markers)
    proof.faults.update(f"kill {name} at {point}" for point, name in armed.items())
    accounts = [f"crash-fan-{rng.getrandbits(40):010x}" for _ in range(fans)]
    creators = [f"crash-creator-{rng.getrandbits(40):010x}" for _ in range(max(2, fans // 2))]
    bindings = bind(system, accounts)
    receipts, wallet, payouts = system.receipts(), system.wallet(), system.payouts()
    app, ops = system.metadata(), system.metadata("payouts:ops")

    with Supervisor(system) as supervisor:
        purchases = []
        for i in range(fans * 3):
            account, store = accounts[i % fans], rng.choice(("apple", "play"))
            purchases.append(buy_one(system, store, account, BIG_PACKS[store], bindings[account]))

        def acknowledge(purchase: Purchase) -> int:
            report = app_report(system, purchase, 0)
            return int(retrying(f"verify {purchase.transaction_id}", report))

        with ThreadPoolExecutor(8) as pool:
            states = list(pool.map(acknowledge, purchases))
        if set(states) - {rpb.PURCHASE_STATE_CREDITED, rpb.PURCHASE_STATE_ALREADY_CREDITED}:
            raise SystemFailure(f"verify answered {Counter(states)}")
        proof.operations["purchases acknowledged"] += len(purchases)

        gifts: Counter[str] = Counter()

        def gift(n: int) -> None:
            sender, creator = accounts[n % fans], creators[n % len(creators)]
            request = wpb.SendGiftRequest(
                request_id=f"crash-gift-{sender}-{n}",
                sender_account_id=sender,
                creator_account_id=creator,
                gift_id="rainbow",
                count=rng.randint(30, 50),  # 4 gifts ≤ the 21,000 coins a fan buys; one creator ≥ 10,000 diamonds
            )
            retrying(f"gift {n}", lambda: wallet.SendGift(request, metadata=app, timeout=30))
            gifts[sender] += 1

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(gift, range(fans * 4)))
        proof.operations["gifts acknowledged"] += sum(gifts.values())

        refunded = rng.sample(purchases, k=max(1, len(purchases) // 4))
        for purchase in refunded:
            if purchase.store == "apple":
                system.sim("/apple/refund", {"transactionId": purchase.transaction_id})
            else:
                system.sim(f"/google/sim/purchases/{purchase.transaction_id}/refund", {})
        proof.operations["refunds by notification"] += len(refunded)

        def refund_applied(purchase: Purchase) -> bool:
            store = rpb.STORE_APP_STORE if purchase.store == "apple" else rpb.STORE_GOOGLE_PLAY
            request = rpb.GetPurchaseRequest(store=store, store_transaction_id=purchase.transaction_id)
            found = retrying("GetPurchase", lambda: receipts.GetPurchase(request, metadata=app, timeout=30))
            return bool(found.purchase.state == rpb.PURCHASE_STATE_REFUNDED)

        wait_until("every refund applied", lambda: all(refund_applied(p) for p in refunded), timeout, interval=0.5)

        cashouts = [c for c in (cash_out(system, creator) for creator in creators) if c is not None]
        proof.operations["cash-outs"] += len(cashouts)
        if cashouts:
            create = ppb.CreatePayoutBatchRequest(request_id=f"crash-batch-{rng.getrandbits(32)}")
            batch = retrying("batch", lambda: payouts.CreatePayoutBatch(create, metadata=ops, timeout=30)).batch

            def completed() -> bool:
                get = ppb.GetPayoutBatchRequest(batch_id=batch.batch_id)
                found = retrying("batch", lambda: payouts.GetPayoutBatch(get, metadata=ops, timeout=30)).batch
                return bool(found.state == ppb.BATCH_STATE_COMPLETED)

            wait_until(f"batch {batch.batch_id} completed", completed, timeout, interval=0.5)
            proof.operations["payout batches"] += 1
        try:
            wait_until("every armed failpoint fired", lambda: all(fired_pid(markers, p) for p in armed), 30)
        except SystemFailure:
            missing = [p for p in armed if not fired_pid(markers, p)]
            raise SystemFailure(f"failpoints never reached: {missing} ({len(cashouts)} cash-outs)") from None
        wait_until("every killed process restarted", lambda: all(not system.exited(n) for n in armed.values()), 60)
    proof.faults.update({f"restart {n}": c for n, c in supervisor.restarts.items()})

    check_once(system, accounts, purchases, gifts)
    check_paid_once(system, cashouts)
    return proof


def cash_out(system: System, creator: str) -> ppb.Cashout | None:
    """A PayPal destination, verified by ops, and a cash-out of every withdrawable
    diamond (None below the minimum)."""
    payouts, app, ops = system.payouts(), system.metadata(), system.metadata("payouts:ops")
    destination = ppb.PayoutDestination(provider=ppb.PROVIDER_PAYPAL, receiver=f"{creator}@example.com")
    set_request = ppb.SetPayoutDestinationRequest(
        request_id=f"dest-{creator}", creator_account_id=creator, destination=destination
    )
    retrying("destination", partial(payouts.SetPayoutDestination, set_request, metadata=app, timeout=30))
    verify = ppb.VerifyPayoutDestinationRequest(
        request_id=f"verify-{creator}",
        creator_account_id=creator,
        provider=destination.provider,
        receiver=destination.receiver,
    )
    retrying("verify", partial(payouts.VerifyPayoutDestination, verify, metadata=ops, timeout=30))
    withdrawable = retrying("balance", partial(system.balance, creator)).diamonds_withdrawable
    if withdrawable < 10_000:
        return None
    request = ppb.RequestCashoutRequest(
        request_id=f"cashout-{creator}", creator_account_id=creator, diamonds=withdrawable
    )
    reply = retrying("cash-out", partial(payouts.RequestCashout, request, metadata=app, timeout=30))
    return reply.cashout  # type: ignore[no-any-return]


def history(system: System, account: str, kind: wpb.TransactionKind.ValueType) -> list[wpb.Transaction]:
    wallet, metadata, rows, token = system.wallet(), system.metadata("wallet:read"), [], ""
    while True:
        page = wallet.ListTransactions(
            wpb.ListTransactionsRequest(account_id=account, page_size=500, page_token=token, kinds=[kind]),
            metadata=metadata,
            timeout=30,
        )
        rows += list(page.transactions)
        token = page.next_page_token
        if not token:
            return rows


def check_once(system: System, accounts: list[str], purchases: list[Purchase], gifts: Counter[str]) -> None:
    """Every acknowledged purchase credited once and every acknowledged gift sent once."""
    for account in accounts:
        mine = sorted(p.transaction_id for p in purchases if p.account == account)
        credited = sorted(t.reference for t in history(system, account, wpb.TRANSACTION_KIND_PURCHASE))
        if credited != mine:
            raise SystemFailure(f"{account}: credited {credited}, acknowledged {mine}")
        sent = len(history(system, account, wpb.TRANSACTION_KIND_GIFT_SENT))
        if sent != gifts[account]:
            raise SystemFailure(f"{account}: {sent} gifts in the ledger, {gifts[account]} acknowledged")


def check_paid_once(system: System, cashouts: list[ppb.Cashout]) -> None:
    """PayPal paid each cash-out exactly once (the simulator's own record)."""
    payments = system.sim("/paypal/sim/payments")["payments"]
    paid = Counter(p["sender_item_id"].rsplit("-", 1)[0] for p in payments)
    for cashout in cashouts:
        if paid[cashout.cashout_id] != 1:
            raise SystemFailure(f"cash-out {cashout.cashout_id} paid {paid[cashout.cashout_id]} times at PayPal")


# -- dependency faults: a fault proxy between the processes and what they depend on --

FAULT_MODES = (Mode.DROP, Mode.HANG, Mode.RESET)
FAULT_TARGETS = ("postgresql", "broker", "simulator", "terminate-backends")
FAULT_SECONDS = 3.0
FAULT_CALL_TIMEOUT = 5.0


def _with_port(url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    host = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _target(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 0)


def terminate_backends(database_url: str) -> int:
    """pg_terminate_backend for every other session of this test's own database (only)."""
    engine = sa.create_engine(normalize_url(database_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
    finally:
        engine.dispose()
    return len(rows)


def dependency_faults(system: System, rng: random.Random, episodes: int = 4, timeout: float = 180) -> Proof:
    """The wallet and receipts reach PostgreSQL, the receipts processes the broker and
    the receipts service the store APIs through fault proxies; in seeded episodes one
    dependency drops, hangs or resets (or its sessions are terminated) while purchases
    and gifts are made: every call answers or fails UNAVAILABLE (or the caller's
    deadline), a retry after the fault succeeds, and the ledger holds each exactly once."""
    proof = Proof()
    with ExitStack() as stack:
        proxies = {
            "postgresql": stack.enter_context(fault_proxy(*_target(system.database_url))),
            "broker": stack.enter_context(fault_proxy(*_target(system.broker_url))),
            "simulator": stack.enter_context(fault_proxy("127.0.0.1", system.port("STORESIM_PORT"))),
        }
        database = _with_port(system.database_url, proxies["postgresql"].port)
        broker = _with_port(system.broker_url, proxies["broker"].port)
        sim = f"http://127.0.0.1:{proxies['simulator'].port}"
        for name in ("wallet", "receipts", "receipts-worker"):
            system.kill(name)
        system.start("wallet", DATABASE_URL=database)
        system.start(
            "receipts",
            DATABASE_URL=database,
            BROKER_URL=broker,
            GOOGLE_API_ENDPOINT=sim + "/",
            APPLE_API_URL=sim + "/apple/production",
        )
        system.start("receipts-worker", DATABASE_URL=database, BROKER_URL=broker)
        system.wait_serving("wallet", "receipts")

        accounts = [f"fault-fan-{rng.getrandbits(40):010x}" for _ in range(3)]
        creator = f"fault-creator-{rng.getrandbits(40):010x}"
        bindings = bind(system, accounts)
        wallet, app = system.wallet(), system.metadata()
        purchases: list[Purchase] = []
        gifts: list[wpb.SendGiftRequest] = []
        outcomes: Counter[str] = Counter()
        order = rng.sample(FAULT_TARGETS, len(FAULT_TARGETS))

        def attempt(call: Callable[[], Any]) -> None:
            try:
                call()
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE:
                    detail = error.details()  # type: ignore[attr-defined]
                    raise SystemFailure(f"under a fault: {code.name} {detail}") from None
                outcomes[code.name] += 1

        for episode in range(episodes):
            # Every target once (in seeded order), then seeded picks.
            target = order[episode] if episode < len(order) else rng.choice(FAULT_TARGETS)
            mode = rng.choice(FAULT_MODES)
            # Work of this episode: made before the fault, sent during it.
            batch = []
            for account in accounts:
                store = rng.choice(("apple", "play"))
                product = rng.choice(sorted(APPLE_PACKS if store == "apple" else PLAY_PACKS))
                batch.append(buy_one(system, store, account, product, bindings[account]))
            purchases += batch
            if target == "terminate-backends":
                proof.faults[f"pg_terminate_backend ({terminate_backends(system.database_url)} sessions)"] += 1
            else:
                proxies[target].set_mode(mode)
                proof.faults[f"{target} {mode.value}"] += 1
            try:
                with ThreadPoolExecutor(6) as pool:
                    calls = [app_report(system, p, episode, FAULT_CALL_TIMEOUT) for p in batch]
                    list(pool.map(attempt, calls))
                time.sleep(0 if target == "terminate-backends" else FAULT_SECONDS)
            finally:
                for proxy in proxies.values():
                    proxy.set_mode(Mode.PASS)
            for p in batch:
                retrying(f"verify {p.transaction_id} after the fault", app_report(system, p, episode, 30))
            spend = min(system.balance(a).coins for a in accounts) // 2
            if spend:
                for account in accounts:
                    request = wpb.SendGiftRequest(
                        request_id=f"fault-gift-{account}-{episode}",
                        sender_account_id=account,
                        creator_account_id=creator,
                        gift_id="rose",
                        count=spend,
                    )
                    gifts.append(request)
                    retrying("gift", partial(wallet.SendGift, request, metadata=app, timeout=30))
        proof.operations.update({f"calls under faults: {k}": v for k, v in outcomes.items()})
        proof.operations["purchases"] += len(purchases)
        proof.operations["gifts"] += len(gifts)

        expected = expected_coins(purchases)
        for request in gifts:
            expected[request.sender_account_id] -= request.count
        wait_until("balances settle", lambda: all(system.balance(a).coins == c for a, c in expected.items()), timeout)
        check_balances(system, expected)
        diamonds = system.balance(creator).diamonds
        if diamonds != sum(g.count for g in gifts):
            raise SystemFailure(f"the creator holds {diamonds} diamonds for {sum(g.count for g in gifts)} gifted coins")
        check_credited(system, purchases)
        # Back on direct connections before the proxies go away.
        for name in ("wallet", "receipts", "receipts-worker"):
            system.kill(name)
            system.start(name)
        system.wait_serving("wallet", "receipts")
    return proof
