"""`coinstore receipts …` subcommands."""

from __future__ import annotations

import argparse

from services.receipts import reconcile_cli


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("receipts", help="receipts service tools")

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(handler=show_help)
    commands = parser.add_subparsers(dest="receipts_command")
    reconcile_cli.add_reconcile(commands)
