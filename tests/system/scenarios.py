"""The system scenarios as plain functions of a running system and a seeded random
source, so the pytest suite and the soak (``python -m tests.system.soak``) run the
same code. Each returns what it proved, for the soak's summary."""

from __future__ import annotations

import random
import re
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from coinstore.receipts.v1 import receipt_service_pb2 as rpb
from tests.system.harness import System, SystemFailure, wait_until

APPLE_PACKS = {"com.coinstore.coins.70": 70, "com.coinstore.coins.350": 350, "com.coinstore.coins.1400": 1400}
PLAY_PACKS = {"coins_70": 70, "coins_350": 350, "coins_1400": 1400}
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


def buy(system: System, rng: random.Random, accounts: list[str], count: int) -> list[Purchase]:
    """``count`` Production purchases in the simulator, each for a random account and
    store; the simulator's own notifications of them are lost on purpose, so the
    storm decides when each report arrives."""
    bindings = bind(system, accounts)
    stores = [rng.choice(("apple", "play")) for _ in range(count)]
    system.sim("/apple/notifications/config", {"auto": False})
    system.sim("/pubsub/control/config", {"lose_next": stores.count("play")})
    purchases = []
    try:
        for store in stores:
            account = rng.choice(accounts)
            if store == "apple":
                product = rng.choice(sorted(APPLE_PACKS))
                reply = system.sim(
                    "/apple/buy", {"productId": product, "appAccountToken": bindings[account].app_account_token}
                )
                purchases.append(
                    Purchase(
                        store,
                        account,
                        product,
                        APPLE_PACKS[product],
                        str(reply["transactionId"]),
                        reply["signedTransaction"],
                    )
                )
            else:
                product = rng.choice(sorted(PLAY_PACKS))
                reply = system.sim(
                    "/google/sim/purchases",
                    {"productId": product, "obfuscatedAccountId": bindings[account].obfuscated_account_id},
                )
                purchases.append(Purchase(store, account, product, PLAY_PACKS[product], str(reply["purchaseToken"])))
    finally:
        system.sim("/apple/notifications/config", {"auto": True})
        system.sim("/pubsub/control/config", {"lose_next": 0})
    return purchases


def app_report(system: System, purchase: Purchase, attempt: int) -> Callable[[], int]:
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
                timeout=60,
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
            timeout=60,
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


def duplicate_storm(system: System, rng: random.Random, purchases_count: int, timeout: float = 240) -> Proof:
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
    wait_notifications(system, before + REPORTS_PER_PATH * len(purchases), timeout)
    check_balances(system, expected_coins(purchases))
    check_credited(system, purchases)
    proof = Proof()
    proof.operations.update(
        {"purchases": len(purchases), "app reports": REPORTS_PER_PATH * len(purchases)}
        | {"store notifications": REPORTS_PER_PATH * len(purchases)}
    )
    return proof


def check_balances(system: System, coins: dict[str, int]) -> None:
    wrong = {a: (system.balance(a).coins, c) for a, c in coins.items() if system.balance(a).coins != c}
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
