"""`coinstore receipts …` subcommands: ``reconcile --since …`` runs the reconciliation by
hand; ``notifications replay --id …|--since …`` gives dead notifications another life."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^(\d+)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("receipts", help="receipts service tools")

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(handler=show_help)
    commands = parser.add_subparsers(dest="receipts_command")
    add_reconcile(commands)
    add_notifications(commands)


def parse_since(raw: str, now: datetime) -> datetime:
    """``7d``, ``12h``, ``30m``, or an ISO 8601 date/time (UTC when no offset is given)."""
    match = _RELATIVE.match(raw.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since: {raw!r} is neither like 7d/12h/30m nor an ISO date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_reconcile(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "reconcile",
        help="apply store refunds and purchases no notification delivered (Google voided purchases,"
        " Apple notification history)",
    )
    parser.add_argument(
        "--since",
        type=lambda raw: parse_since(raw, datetime.now(UTC)),
        default=None,
        help="read from then to now instead of continuing where the last run stopped: 7d, 12h, 30m or an ISO date",
    )
    parser.add_argument("--store", choices=("all", "google", "apple"), default="all")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.common.bootstrap import load, run_main
    from services.receipts.config import ReceiptsSettings
    from services.receipts.wiring import build_notification_worker

    def main() -> int:
        since: datetime | None = args.since
        settings = load(ReceiptsSettings, "receipts-reconcile")
        reconciler = build_notification_worker(settings).reconciler
        with tqdm(desc="reconciling", unit="purchase", file=sys.stderr) as bar:

            def progress(count: int) -> None:
                bar.update(count)

            if args.store == "google":
                results = [reconciler.google(since, progress)]
            elif args.store == "apple":
                results = [reconciler.apple(since, progress)]
            else:
                results = reconciler.run(since, progress)
        for result in results:
            print(f"{result.source}: examined {result.examined}, applied {result.applied}, pages {result.pages}")
        return 0

    return run_main("receipts-reconcile", main)


def add_notifications(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("notifications", help="the store notification inbox")
    commands = parser.add_subparsers(dest="notifications_command", required=True)
    replay = commands.add_parser(
        "replay",
        help="queue dead notifications again (a fresh attempt budget; their attempt errors are kept)",
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, action="append", dest="ids", help="a dead notification's row id (repeatable)")
    which.add_argument(
        "--since",
        type=lambda raw: parse_since(raw, datetime.now(UTC)),
        help="every dead notification received since: 7d, 12h, 30m or an ISO date",
    )
    replay.set_defaults(handler=_replay)


def _replay(args: argparse.Namespace) -> int:
    from services.common.bootstrap import load, run_main
    from services.common.celery_app import make_celery_app
    from services.common.db import Database
    from services.receipts.config import ReceiptsSettings
    from services.receipts.notifications import tasks
    from services.receipts.wiring import inbox

    def main() -> int:
        settings = load(ReceiptsSettings, "receipts-replay")
        database = Database.from_url(settings.database_url, 2)
        try:
            replayed = inbox(settings, database).replay(datetime.now(UTC), args.ids or (), args.since)
        finally:
            database.close()
        dispatch = tasks.sender(make_celery_app(settings.receipts_queue, settings.broker_url), settings.receipts_queue)
        for notification_id in replayed:
            dispatch(notification_id)
        print(f"replayed {len(replayed)} dead notification(s): {' '.join(map(str, replayed)) or '-'}")
        return 0

    return run_main("receipts-replay", main)
