"""`coinstore wallet …` subcommands."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from datetime import timedelta

from services.common.catalog import load_catalog
from services.common.clock import SystemClock
from services.common.db import Database
from services.common.settings import load_settings
from services.wallet.audit import audit, credits_without_evidence, holds_to_review
from services.wallet.config import WalletSettings
from services.wallet.store import WalletStore


@contextlib.contextmanager
def _database() -> Iterator[tuple[WalletSettings, Database]]:
    """The settings and a one-connection database for one command, closed after it."""
    settings = load_settings(WalletSettings)
    database = Database.from_url(settings.database_url_for("wallet"), 1)
    try:
        yield settings, database
    finally:
        database.close()


def cmd_audit(args: argparse.Namespace) -> int:
    with _database() as (_, database):
        problems = audit(database)
        unproven, listed = credits_without_evidence(database)
    for problem in problems:
        print(problem)
    for line in listed:
        print(line)
    if unproven:
        print(f"{unproven} credits without evidence (the store evidence hash the crediting service verified)")
    if problems:
        print(f"audit FAILED: {len(problems)} discrepancies")
        return 1
    if unproven and args.require_evidence:
        return 1
    print("audit clean: every transaction sums to zero per currency and every balance matches its entries")
    return 0


def cmd_review_holds(_args: argparse.Namespace) -> int:
    with _database() as (_, database):
        lines = holds_to_review(database)
    for line in lines:
        print(line)
    print(f"{len(lines)} settled holds flagged for review")
    return 0


def _store(settings: WalletSettings, database: Database) -> WalletStore:
    return WalletStore(
        database,
        load_catalog(settings.catalog),
        SystemClock(),
        reservation_ttl=timedelta(days=settings.wallet_reservation_ttl_days),
    )


def cmd_expire(_args: argparse.Namespace) -> int:
    with _database() as (settings, database):
        print(f"expired {_store(settings, database).sweep_expired()} reservations")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with _database() as (settings, database):
        items, _ = _store(settings, database).history(
            args.account, page_size=args.limit, page_token="", kinds=(), start=None, end=None
        )
    for item in items:
        print(
            f"{item.created_at.isoformat(timespec='seconds')}  {item.kind.value:<20} "
            f"coins {item.coins_delta:+d} diamonds {item.diamonds_delta:+d}  {item.reference}  "
            f"by {item.moved_by.describe()}"
        )
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
    p.add_argument(
        "--require-evidence", action="store_true", help="also exit 1 if a credit came without an evidence hash"
    )
    p.set_defaults(handler=cmd_audit)
    p = sub.add_parser(
        "history", help="an account's latest transactions and who moved each (caller, key, act, request)"
    )
    p.add_argument("account")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=cmd_history)
    p = sub.add_parser(
        "review-holds", help="list settled holds flagged for review (paid cash-outs whose holds fell short)"
    )
    p.set_defaults(handler=cmd_review_holds)
    p = sub.add_parser("expire-reservations", help="return the diamonds of every reservation past its expiry")
    p.set_defaults(handler=cmd_expire)
