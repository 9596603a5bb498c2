"""`coinstore storesim …` subcommands."""

from __future__ import annotations

import argparse


def _serve(_args: argparse.Namespace) -> int:
    from services.storesim.__main__ import main

    main()
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("storesim", help="the store simulator (App Store, Google Play, PayPal)")
    sub = parser.add_subparsers(dest="storesim_command", required=True)
    p = sub.add_parser("serve", help="run the simulator in the foreground")
    p.set_defaults(handler=_serve)
