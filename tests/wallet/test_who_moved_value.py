"""Who moved value: every ledger transaction keeps the authenticated caller (sub, key
id), whom it acted for (act) and its request id, and history shows them; each credit
keeps the evidence hash it was asked with. Tokens come from distinct keys of a key policy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.common.auth import TokenVerifier, load_key_policy
from tests.support.status import error_info
from tests.support.tokens import Grant, Keys, make_keys, write_key_policy
from tests.wallet.support import Wallet, credit_request, running_wallet, unique

CATALOG = Path(__file__).resolve().parents[2] / "deploy" / "catalog.toml"
EVIDENCE = hashlib.sha256(b"the signed transaction JWS").hexdigest()


@pytest.fixture
async def callers(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Wallet, dict[str, Keys]]]:
    keys = {name: make_keys(tmp_path / name, f"{name}-1") for name in ("app", "receipts", "payouts")}
    policy = write_key_policy(
        tmp_path / "policy.toml",
        [
            Grant(keys["app"], ("app-backend",), ("wallet:read", "wallet:gift"), may_act=True),
            Grant(keys["receipts"], ("receipts",), ("wallet:credit",)),
            Grant(keys["payouts"], ("payouts",), ("wallet:reserve",)),
        ],
    )
    verifier = TokenVerifier(load_key_policy(policy))
    async with running_wallet(database_url, keys["app"], tmp_path, verifier=verifier) as wallet:
        yield wallet, keys


async def history(wallet: Wallet, keys: dict[str, Keys], account: str) -> list[pb.Transaction]:
    reply = await wallet.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id=account),
        metadata=keys["app"].metadata("wallet:read", subject="app-backend"),
    )
    return list(reply.transactions)


def mover(transaction: pb.Transaction) -> tuple[str, str, str, str]:
    moved = transaction.moved_by
    return moved.subject, moved.key_id, moved.acting_for, moved.request_id


async def test_history_names_who_credited_gifted_and_held(callers: tuple[Wallet, dict[str, Keys]]) -> None:
    wallet, keys = callers
    receipts = keys["receipts"].metadata("wallet:credit", subject="receipts")
    request = credit_request("fan", 100, stx="stx-who", request_id="credit-who")
    request.evidence_sha256 = EVIDENCE
    await wallet.stub.CreditPurchase(request, metadata=receipts)
    await wallet.stub.SendGift(
        pb.SendGiftRequest(
            request_id="gift-who", sender_account_id="fan", creator_account_id="star", gift_id="panda", count=2
        ),
        metadata=keys["app"].metadata("wallet:gift", subject="app-backend", act="fan"),
    )
    await wallet.stub.ReserveDiamonds(
        pb.ReserveDiamondsRequest(request_id="hold-who", account_id="star", diamonds=4, reservation_id="co-1"),
        metadata=keys["payouts"].metadata("wallet:reserve", subject="payouts"),
    )

    fan = await history(wallet, keys, "fan")
    assert [(t.kind, mover(t)) for t in fan] == [
        (pb.TRANSACTION_KIND_GIFT_SENT, ("app-backend", "app-1", "fan", "gift-who")),
        (pb.TRANSACTION_KIND_PURCHASE, ("receipts", "receipts-1", "", "credit-who")),
    ]
    star = await history(wallet, keys, "star")
    assert [(t.kind, mover(t)) for t in star] == [
        (pb.TRANSACTION_KIND_RESERVATION, ("payouts", "payouts-1", "", "hold-who")),
        (pb.TRANSACTION_KIND_GIFT_RECEIVED, ("app-backend", "app-1", "fan", "gift-who")),
    ]

    purchase = await wallet.stub.GetPurchaseConsumption(
        pb.GetPurchaseConsumptionRequest(
            store=pb.STORE_APP_STORE, environment=pb.STORE_ENVIRONMENT_PRODUCTION, store_transaction_id="stx-who"
        ),
        metadata=keys["app"].metadata("wallet:read", subject="app-backend"),
    )
    assert purchase.evidence_sha256 == EVIDENCE
    assert (purchase.credited_by.subject, purchase.credited_by.key_id) == ("receipts", "receipts-1")
    assert purchase.credited_by.request_id == "credit-who"

    # The ops report says the same.
    env = {**os.environ, "COINSTORE_WALLET_DATABASE_URL": wallet.url, "COINSTORE_CATALOG": str(CATALOG)}
    report = subprocess.run(
        [sys.executable, "-m", "services.cli", "wallet", "history", "star"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert "by payouts (key payouts-1), request hold-who" in report[0]
    assert "GIFT_RECEIVED" in report[1]
    assert "by app-backend (key app-1) for fan, request gift-who" in report[1]


async def test_each_gift_of_a_group_commit_keeps_its_own_caller(callers: tuple[Wallet, dict[str, Keys]]) -> None:
    wallet, keys = callers
    fans = [unique("fan") for _ in range(24)]
    receipts = keys["receipts"].metadata("wallet:credit", subject="receipts")
    await asyncio.gather(*(wallet.stub.CreditPurchase(credit_request(f, 10), metadata=receipts) for f in fans))
    # Concurrent gifts share database transactions; each must still name its own caller.
    await asyncio.gather(
        *(
            wallet.stub.SendGift(
                pb.SendGiftRequest(
                    request_id=f"gift-{f}", sender_account_id=f, creator_account_id="star", gift_id="rose", count=1
                ),
                metadata=keys["app"].metadata("wallet:gift", subject="app-backend", act=f),
            )
            for f in fans
        )
    )
    received = await history(wallet, keys, "star")
    assert sorted(
        (t.counterparty_account_id, t.moved_by.acting_for, t.moved_by.request_id) for t in received
    ) == sorted((f, f, f"gift-{f}") for f in fans)


async def test_the_audit_lists_credits_without_evidence(callers: tuple[Wallet, dict[str, Keys]]) -> None:
    wallet, keys = callers
    receipts = keys["receipts"].metadata("wallet:credit", subject="receipts")
    proven = credit_request("fan", 100, stx="stx-proven")
    proven.evidence_sha256 = EVIDENCE
    await wallet.stub.CreditPurchase(proven, metadata=receipts)
    await wallet.stub.CreditPurchase(credit_request("fan", 500, stx="stx-bare", request_id="bare"), metadata=receipts)

    def audit_command(*flags: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COINSTORE_WALLET_DATABASE_URL": wallet.url, "COINSTORE_CATALOG": str(CATALOG)}
        return subprocess.run(
            [sys.executable, "-m", "services.cli", "wallet", "audit", *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = audit_command()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if "without evidence:" in line] == [
        "credit without evidence: APP_STORE/PRODUCTION/stx-bare to fan, 500 coins,"
        " by receipts (key receipts-1), request bare"
    ]
    assert "1 credits without evidence" in done.stdout
    assert audit_command("--require-evidence").returncode == 1


async def test_a_malformed_evidence_hash_is_refused(callers: tuple[Wallet, dict[str, Keys]]) -> None:
    wallet, keys = callers
    request = credit_request("fan", 100)
    request.evidence_sha256 = EVIDENCE.upper()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wallet.stub.CreditPurchase(
            request, metadata=keys["receipts"].metadata("wallet:credit", subject="receipts")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "evidence_sha256"
