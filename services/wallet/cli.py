"""`coinstore wallet …` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta

from services.common.catalog import load_catalog
from services.common.clock import SystemClock
from services.common.db import Database
from services.common.settings import load_settings
from services.wallet.audit import audit, holds_to_review
from services.wallet.config import WalletSettings
from services.wallet.store import WalletStore


def _read(query: Callable[[Database], list[str]]) -> list[str]:
    settings = load_settings(WalletSettings)
    database = Database.from_url(settings.database_url_for("wallet"), 1)
    try:
        return query(database)
    finally:
        database.close()


def cmd_audit(_args: argparse.Namespace) -> int:
    problems = _read(audit)
    for problem in problems:
        print(problem)
    if problems:
        print(f"audit FAILED: {len(problems)} discrepancies")
        return 1
    print("audit clean: every transaction sums to zero per currency and every balance matches its entries")
    return 0


def cmd_review_holds(_args: argparse.Namespace) -> int:
    lines = _read(holds_to_review)
    for line in lines:
        print(line)
    print(f"{len(lines)} settled holds flagged for review")
    return 0


def cmd_expire(_args: argparse.Namespace) -> int:
    settings = load_settings(WalletSettings)
    database = Database.from_url(settings.database_url_for("wallet"), 1)
    try:
        store = WalletStore(
            database,
            load_catalog(settings.catalog),
            SystemClock(),
            reservation_ttl=timedelta(days=settings.wallet_reservation_ttl_days),
        )
        print(f"expired {store.sweep_expired()} reservations")
    finally:
        database.close()
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("wallet", help="wallet service tools")

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(handler=show_help)
    sub = parser.add_subparsers(dest="wallet_command")
    p = sub.add_parser(
        "audit",
        help="rebuild every balance from the ledger entries, check every transaction sums to zero;"
        " exits 1 on any discrepancy",
    )
    p.set_defaults(handler=cmd_audit)
    p = sub.add_parser(
        "review-holds", help="list settled holds flagged for review (paid cash-outs whose holds fell short)"
    )
    p.set_defaults(handler=cmd_review_holds)
    p = sub.add_parser("expire-reservations", help="return the diamonds of every reservation past its expiry")
    p.set_defaults(handler=cmd_expire)
