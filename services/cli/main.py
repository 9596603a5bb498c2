"""The `coinstore` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.cli import demo, dev
from services.common import auth
from services.common.auth import load_key_policy
from services.common.settings import CommonSettings, SettingsError, describe, load_settings
from services.payouts import cli as payouts_cli
from services.receipts import cli as receipts_cli
from services.storesim import cli as storesim_cli
from services.wallet import cli as wallet_cli

SERVICES = ("wallet", "receipts", "payouts")


def _settings_classes() -> list[type[Any]]:
    from services.payouts.config import PayoutsSettings
    from services.receipts.config import ReceiptsSettings
    from services.storesim.config import StoresimSettings
    from services.wallet.config import WalletSettings

    return [CommonSettings, WalletSettings, ReceiptsSettings, PayoutsSettings, StoresimSettings]


def cmd_migrate(args: argparse.Namespace) -> int:
    from services.common import migrate

    settings = load_settings(CommonSettings)
    pairs = [pair.partition("=") for pair in args.grant]
    grants = {service: role for service, _, role in pairs}
    if any(not role or service not in SERVICES for service, _, role in pairs):
        print(f"--grant takes SERVICE=ROLE with SERVICE one of {', '.join(SERVICES)}", file=sys.stderr)
        return 2
    for service in args.service or SERVICES:
        migrate.upgrade(service, settings.database_url)
        print(f"migrated {service}")
    for service, role in grants.items():
        migrate.grant(service, settings.database_url, role)
        print(f"granted {role} the {service} tables")
    return 0


MAX_TOKEN_SECONDS = 3600


def cmd_keygen(args: argparse.Namespace) -> int:
    private, public = Path(args.private), Path(args.public)
    created = auth.generate_keypair(private, public)
    print(f"{'created' if created else 'kept existing'} {private} and {public}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    key = auth.load_private_key(Path(args.key))
    scopes = args.scopes.split()
    unknown = sorted(set(scopes) - auth.SCOPES)
    if unknown:
        print(f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(sorted(auth.SCOPES))}", file=sys.stderr)
        return 2
    # The key policy's lifetime for this kid when there is one; an hour at most anyway.
    settings = load_settings(CommonSettings)
    trusted = load_key_policy(settings.auth_key_policy).by_kid(args.kid) if settings.auth_key_policy else None
    longest = trusted.max_lifetime_seconds if trusted and trusted.max_lifetime_seconds else MAX_TOKEN_SECONDS
    if not 0 < args.ttl <= longest:
        print(f"--ttl must be between 1 and {longest} seconds for this key", file=sys.stderr)
        return 2
    print(auth.mint_token(key, args.subject, scopes, args.ttl, kid=args.kid, act=args.act))
    return 0


def config_table() -> str:
    seen: set[str] = set()
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for cls in _settings_classes():
        for row in describe(cls):
            if row.env not in seen:
                seen.add(row.env)
                lines.append(f"| `{row.env}` | `{row.default}` | {row.doc} |")
    return "\n".join(lines) + "\n"


def cmd_config(args: argparse.Namespace) -> int:
    table = config_table()
    if not args.readme:
        print(table, end="")
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    begin, end = "<!-- config:begin -->\n", "<!-- config:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(head + begin + table + end + tail)
    print(f"updated the configuration table in {readme}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    importlib.import_module(f"services.{args.service}.__main__").main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinstore", description="coinstore: app-store coin economy backend")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply database migrations (COINSTORE_DATABASE_URL)")
    p.add_argument("service", nargs="*", help=f"services to migrate: {', '.join(SERVICES)} (default: all)")
    p.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="SERVICE=ROLE",
        help="then let ROLE read and write that service's tables only (PostgreSQL; repeat per service)",
    )
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("service", choices=SERVICES)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("config", help="print every setting as a Markdown table")
    p.add_argument("--readme", metavar="FILE", help="rewrite the table between the config markers of FILE")
    p.set_defaults(handler=cmd_config)

    auth_parser = sub.add_parser("auth", help="caller tokens for development")
    auth_sub = auth_parser.add_subparsers(dest="auth_command", required=True)
    p = auth_sub.add_parser("keygen", help="create the local development key pair")
    p.add_argument("--private", default="var/auth/dev-private.pem")
    p.add_argument("--public", default="var/auth/dev-public.pem")
    p.set_defaults(handler=cmd_keygen)
    p = auth_sub.add_parser("token", help="mint a bearer token from the local development key")
    p.add_argument("--subject", required=True, help="caller name (the token's sub)")
    p.add_argument("--scopes", required=True, help='space-separated scopes, e.g. "wallet:read wallet:gift"')
    p.add_argument(
        "--ttl", type=int, default=900, help="seconds until the token expires (at most the key's lifetime, 1 hour)"
    )
    p.add_argument("--kid", default="", help="the signing key's id, as the key policy names it")
    p.add_argument("--act", default="", help="the person or end user the caller acts for (act claim)")
    p.add_argument("--key", default="var/auth/dev-private.pem", help="PEM private key to sign with")
    p.set_defaults(handler=cmd_token)

    dev.register(sub)
    demo.register(sub)
    wallet_cli.register(sub)
    receipts_cli.register(sub)
    payouts_cli.register(sub)
    storesim_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except SettingsError as exc:
        print(f"coinstore: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code or 0)
