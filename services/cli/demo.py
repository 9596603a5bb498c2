"""`coinstore demo` (`make demo`): a newcomer's journey through a running system.

Against the services `make run` started (ports and dev signing key from the same
settings), it buys coins in the App Store and Google Play simulators, verifies
them, gifts to a creator, refunds one purchase by store notification and shows
the clawback following the money, cashes the creator out, pays the batch with the
ops CLI and shows its report, printing each step and the balances. It talks only
through the public interfaces: gRPC, the simulators' HTTP controls and the CLI.
The system suite runs it as its first scenario (tests/system/test_scenarios.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from coinstore.payouts.v1 import payout_service_pb2 as ppb
from coinstore.payouts.v1 import payout_service_pb2_grpc as ppb_grpc
from coinstore.receipts.v1 import receipt_service_pb2 as rpb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as rpb_grpc
from coinstore.wallet.v1 import wallet_service_pb2 as wpb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as wpb_grpc
from services.common.auth import load_private_key, mint_token
from services.common.settings import CommonSettings, load_settings

APP_SCOPES = ("purchases:verify", "wallet:read", "wallet:gift", "payouts:request")
CALL_TIMEOUT_SECONDS = 30.0
APPLE_PACK, APPLE_COINS = "com.coinstore.coins.1400", 1400
PLAY_PACK, PLAY_QUANTITY, PLAY_COINS = "coins_7000", 3, 21000
GIFT, GIFT_COUNT = "rainbow", 200  # 100 coins each: 20,000 coins


class DemoError(RuntimeError):
    """A step did not do what the story says; the message says which."""


@dataclass(frozen=True)
class Endpoints:
    receipts: str
    wallet: str
    payouts: str
    simulator: str


def endpoints() -> Endpoints:
    common = load_settings(CommonSettings)
    return Endpoints(
        receipts=f"127.0.0.1:{common.receipts_grpc_port}",
        wallet=f"127.0.0.1:{common.wallet_grpc_port}",
        payouts=f"127.0.0.1:{common.payouts_grpc_port}",
        simulator=f"http://127.0.0.1:{common.storesim_port}",
    )


class Demo:
    def __init__(self, where: Endpoints, token: str, wait_seconds: float) -> None:
        self.where = where
        self.wait_seconds = wait_seconds
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channels = [grpc.insecure_channel(a) for a in (where.receipts, where.wallet, where.payouts)]
        self.receipts = rpb_grpc.ReceiptServiceStub(self._channels[0])
        self.wallet = wpb_grpc.WalletServiceStub(self._channels[1])
        self.payouts = ppb_grpc.PayoutServiceStub(self._channels[2])
        run = uuid.uuid4().hex[:8]
        self.fan, self.creator = f"demo-fan-{run}", f"demo-creator-{run}"
        self.run = run
        self.step_no = 0

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def call(self, stub: Any, method: str, request: Any) -> Any:
        return getattr(stub, method)(request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS)

    def sim(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (the local simulator)
            self.where.simulator + path, data=data, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_SECONDS) as reply:  # noqa: S310
            return json.loads(reply.read() or b"{}")

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n== {self.step_no}. {title}", flush=True)

    def balance(self, account: str) -> wpb.Balance:
        reply: wpb.GetBalanceResponse = self.call(self.wallet, "GetBalance", wpb.GetBalanceRequest(account_id=account))
        return reply.balance

    def show_balances(self) -> None:
        fan, creator = self.balance(self.fan), self.balance(self.creator)
        print(f"   fan      {self.fan}: {fan.coins:>6} coins  (debt {fan.debt_coins})")
        print(
            f"   creator  {self.creator}: {creator.diamonds:>6} diamonds"
            f"  ({creator.diamonds_withdrawable} withdrawable, {creator.diamonds_reserved} reserved,"
            f" debt {creator.diamond_debt})",
            flush=True,
        )

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while not check():
            if time.monotonic() > deadline:
                raise DemoError(f"{what} did not happen within {self.wait_seconds:.0f}s")
            time.sleep(0.2)

    def ops(self, *args: str) -> str:
        """The ops CLI, as an operator would type it; its output is shown."""
        print(f"   $ coinstore payouts {' '.join(args)}", flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "payouts", "--address", self.where.payouts, *args],
            capture_output=True,
            text=True,
            timeout=max(self.wait_seconds, CALL_TIMEOUT_SECONDS) + 30,
            check=False,
        )
        for line in done.stdout.splitlines():
            print(f"     {line}")
        if done.returncode != 0:
            raise DemoError(f"coinstore payouts {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def verify_apple(self, request_id: str, signed: str) -> rpb.PurchaseResult:
        request = rpb.VerifyApplePurchaseRequest(request_id=request_id, account_id=self.fan, signed_transaction=signed)
        reply: rpb.VerifyApplePurchaseResponse = self.call(self.receipts, "VerifyApplePurchase", request)
        return reply.purchases[0]

    def journey(self) -> None:
        binding = self.call(self.receipts, "GetPurchaseBinding", rpb.GetPurchaseBindingRequest(account_id=self.fan))

        self.step(f"The fan buys {APPLE_COINS:,} coins in the App Store (Production) and the app verifies them")
        bought = self.sim("/apple/buy", {"productId": APPLE_PACK, "appAccountToken": binding.app_account_token})
        apple_id = str(bought["transactionId"])
        result = self.verify_apple(f"demo-apple-{self.run}", bought["signedTransaction"])
        state = rpb.PurchaseState.Name(result.state)
        print(f"   App Store transaction {apple_id}: {state}, {result.coins_credited} coins")

        self.step(f"The fan buys {PLAY_QUANTITY} × {PLAY_PACK} in Google Play (Production) and the app verifies them")
        play = self.sim(
            "/google/sim/purchases",
            {"productId": PLAY_PACK, "obfuscatedAccountId": binding.obfuscated_account_id, "quantity": PLAY_QUANTITY},
        )
        reply = self.call(
            self.receipts,
            "VerifyGooglePurchase",
            rpb.VerifyGooglePurchaseRequest(
                request_id=f"demo-play-{self.run}",
                account_id=self.fan,
                product_id=PLAY_PACK,
                purchase_token=play["purchaseToken"],
            ),
        )
        result = reply.purchase
        print(f"   Play order {result.order_id}: {rpb.PurchaseState.Name(result.state)}, {result.coins_credited} coins")

        self.step("Each purchase is credited once, however often it is reported")
        print("   (the stores' notifications for both purchases arrive too; the app retries its App Store call)")
        self.verify_apple(f"demo-apple-retry-{self.run}", bought["signedTransaction"])
        total = APPLE_COINS + PLAY_COINS
        self.wait_for("both credits", lambda: self.balance(self.fan).coins == total)
        self.show_balances()
        if self.balance(self.fan).coins != total:
            raise DemoError(f"the fan should hold {total} coins")

        self.step(f"The fan sends the creator {GIFT_COUNT} × {GIFT} during a live stream")
        gift = self.call(
            self.wallet,
            "SendGift",
            wpb.SendGiftRequest(
                request_id=f"demo-gift-{self.run}",
                sender_account_id=self.fan,
                creator_account_id=self.creator,
                gift_id=GIFT,
                count=GIFT_COUNT,
                live_stream_id=f"demo-stream-{self.run}",
            ),
        )
        print(f"   {gift.coins_spent} coins spent (oldest coins first: the App Store coins went into it)")
        print(f"   {gift.diamonds_to_creator} diamonds to the creator")
        self.show_balances()

        self.step("Apple refunds the App Store purchase and notifies coinstore (App Store Server Notification REFUND)")
        before = self.balance(self.creator).diamonds
        self.sim("/apple/refund", {"transactionId": apple_id})

        def refunded() -> bool:
            found = self.call(
                self.receipts,
                "GetPurchase",
                rpb.GetPurchaseRequest(store=rpb.STORE_APP_STORE, store_transaction_id=apple_id),
            ).purchase
            return bool(found.state == rpb.PURCHASE_STATE_REFUNDED)

        self.wait_for("the refund notification", refunded)
        self.wait_for("the clawback", lambda: self.balance(self.creator).diamonds < before)
        clawed = before - self.balance(self.creator).diamonds
        print(f"   those {APPLE_COINS} coins had been gifted, so the clawback follows the money:")
        print(f"   {clawed} diamonds came back from the creator; the fan keeps the Play coins")
        self.show_balances()

        self.step("The creator cashes out to PayPal; ops verify the destination")
        receiver = f"{self.creator}@example.com"
        self.call(
            self.payouts,
            "SetPayoutDestination",
            ppb.SetPayoutDestinationRequest(
                request_id=f"demo-dest-{self.run}",
                creator_account_id=self.creator,
                destination=ppb.PayoutDestination(provider=ppb.PROVIDER_PAYPAL, receiver=receiver),
            ),
        )
        self.ops("verify-destination", self.creator)
        withdrawable = self.balance(self.creator).diamonds_withdrawable
        cashout = self.call(
            self.payouts,
            "RequestCashout",
            ppb.RequestCashoutRequest(
                request_id=f"demo-cashout-{self.run}", creator_account_id=self.creator, diamonds=withdrawable
            ),
        ).cashout
        amount = cashout.amount
        print(
            f"   cash-out {cashout.cashout_id}: {cashout.diamonds} diamonds held for "
            f"{amount.amount_minor / 100:.2f} {amount.currency_code}"
        )
        self.show_balances()

        self.step("Ops run a payout batch with the ops CLI and watch it complete")
        created = self.ops("create-batch", "--request-id", f"demo-batch-{self.run}")
        batch_id = created.split()[1]
        self.ops("status", batch_id)

        self.step("The batch report")
        self.ops("report", batch_id)
        self.ops("report", batch_id, "--csv")
        paid = [p for p in self.sim("/paypal/sim/payments")["payments"] if p["receiver"] == receiver]
        for payment in paid:
            print(
                f"   PayPal paid {payment['amount']['value']} {payment['amount']['currency']} to {receiver}"
                f" ({payment['transaction_status']})"
            )
        if len(paid) != 1:
            raise DemoError(f"PayPal should have paid {receiver} once, not {len(paid)} times")
        self.wait_for(
            "the wallet commit of the paid cash-out", lambda: self.balance(self.creator).diamonds_reserved == 0
        )
        self.show_balances()

        self.step("The books balance")
        print("   $ coinstore wallet audit", flush=True)
        audit = subprocess.run(
            [sys.executable, "-m", "services.cli", "wallet", "audit"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        print(f"     {audit.stdout.strip()}")
        if audit.returncode != 0:
            raise DemoError("the wallet audit found discrepancies")
        print("\ndemo complete: every step above went through coinstore's public interfaces")


def run(args: argparse.Namespace) -> int:
    common = load_settings(CommonSettings)
    token = mint_token(
        load_private_key(common.auth_signing_key), "demo-app", APP_SCOPES, 900, kid=common.auth_signing_key_id
    )
    demo = Demo(endpoints(), token, args.wait)
    try:
        demo.journey()
    except (DemoError, grpc.RpcError, urllib.error.URLError, OSError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)  # type: ignore[attr-defined]
        print(f"\ncoinstore demo: step {demo.step_no} failed: {detail}", file=sys.stderr)
        print("is `make run` up in another terminal?", file=sys.stderr)
        return 1
    finally:
        demo.close()
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", help="walk a fan's purchase to a creator's payout on a running system (make demo)"
    )
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for asynchronous steps")
    p.set_defaults(handler=run)
