"""Settings of the receipts service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import CommonSettings, SettingsError, setting


class RegionPolicy(enum.Enum):
    ALLOW = "allow"
    FLAG = "flag"
    REFUSE = "refuse"


@dataclass(frozen=True, kw_only=True, repr=False)
class ReceiptsSettings(CommonSettings):
    """Everything the receipts service reads from the environment."""

    binding_secret: str = setting(
        "BINDING_SECRET",
        "Server secret the per-account appAccountToken / obfuscatedAccountId are derived with",
        "dev-binding-secret-change-me",
        secret=True,
    )
    region_policy: RegionPolicy = setting(
        "REGION_POLICY", "Storefront vs account country: allow, flag (credit and mark) or refuse", RegionPolicy.FLAG
    )
    sandbox_accounts: tuple[str, ...] = setting(
        "SANDBOX_ACCOUNTS",
        "Accounts whose Sandbox / Play test purchases are credited (as Sandbox value): comma-separated account ids"
        " (include the App Review demo account), * for everyone (development), empty for nobody",
        ("*",),
    )

    # --- App Store ---
    apple_bundle_id: str = setting(
        "APPLE_BUNDLE_ID", "The app's bundle id; transactions must carry it", "com.coinstore.app"
    )
    apple_app_id: int = setting(
        "APPLE_APP_ID", "The app's Apple id (appAppleId), checked on production notifications", 1234567890
    )
    apple_root_certs: tuple[Path, ...] = setting(
        "APPLE_ROOT_CERTS",
        "Comma-separated DER or PEM root certificates JWS chains must end at (production: Apple Root CA - G3)",
        (Path("var/storesim/apple/root.der"),),
    )
    apple_online_checks: bool = setting(
        "APPLE_ONLINE_CHECKS", "Check certificate revocation with OCSP (cached) when verifying JWS", False
    )
    apple_api_url: str = setting(
        "APPLE_API_URL", "App Store Server API base URL, production", "http://127.0.0.1:8090/apple/production"
    )
    apple_sandbox_api_url: str = setting(
        "APPLE_SANDBOX_API_URL", "App Store Server API base URL, sandbox", "http://127.0.0.1:8090/apple/sandbox"
    )
    apple_api_key_file: Path = setting(
        "APPLE_API_KEY_FILE",
        "In-App Purchase key (.p8) for App Store Server API tokens",
        Path("var/storesim/apple/SubscriptionKey.p8"),
        secret=True,
    )
    apple_api_key_id: str = setting("APPLE_API_KEY_ID", "Key id (kid) of the In-App Purchase key", "SIMKEY0001")
    apple_api_issuer_id: str = setting(
        "APPLE_API_ISSUER_ID", "Issuer id (iss) from App Store Connect", "57246542-96fe-1a63-e053-0824d011072a"
    )
    apple_api_timeout_seconds: float = setting(
        "APPLE_API_TIMEOUT_SECONDS", "Timeout of each App Store Server API call", 10.0, parse=float
    )
    apple_send_consumption: bool = setting(
        "APPLE_SEND_CONSUMPTION", "Answer CONSUMPTION_REQUEST notifications with Send Consumption Information", False
    )

    # --- Google Play ---
    google_package_name: str = setting("GOOGLE_PACKAGE_NAME", "The app's Play package name", "com.coinstore.app")
    google_service_account_file: Path = setting(
        "GOOGLE_SERVICE_ACCOUNT_FILE",
        "Service-account JSON key for the Android Publisher API",
        Path("var/storesim/google/service-account.json"),
        secret=True,
    )
    google_api_endpoint: str = setting(
        "GOOGLE_API_ENDPOINT", "Android Publisher API endpoint override (empty = Google's)", "http://127.0.0.1:8090/"
    )
    google_api_timeout_seconds: float = setting(
        "GOOGLE_API_TIMEOUT_SECONDS", "Timeout of each Android Publisher API call", 10.0, parse=float
    )
    google_consume_overdue_seconds: int = setting(
        "GOOGLE_CONSUME_OVERDUE_SECONDS",
        "Age after which the sweep retries a credited Play purchase still not consumed (Google refunds after 3 days)",
        3600,
    )
    google_consume_sweep_seconds: float = setting(
        "GOOGLE_CONSUME_SWEEP_SECONDS",
        "How often Celery beat runs the unconsumed Play purchase sweep",
        300.0,
        parse=float,
    )

    # --- Store notifications ---
    pubsub_jwks_url: str = setting(
        "PUBSUB_JWKS_URL",
        "JWKS of the keys Pub/Sub push tokens are signed with",
        "https://www.googleapis.com/oauth2/v3/certs",
    )
    pubsub_audience: str = setting(
        "PUBSUB_AUDIENCE", "Expected aud of Pub/Sub push tokens", "http://127.0.0.1:8080/notifications/google"
    )
    pubsub_service_account: str = setting(
        "PUBSUB_SERVICE_ACCOUNT",
        "Expected email of Pub/Sub push tokens",
        "pubsub-push@coinstore-dev.iam.gserviceaccount.com",
    )
    receipts_queue: str = setting(
        "RECEIPTS_QUEUE", "Celery queue the receipts worker's tasks (notifications, Play consume) run on", "receipts"
    )
    notifications_sweep_seconds: float = setting(
        "NOTIFICATIONS_SWEEP_SECONDS",
        "How often the worker's beat re-queues stored notifications that are unprocessed or due a retry",
        30.0,
        parse=float,
    )

    # --- Crediting (the outbox) ---
    credit_sweep_seconds: float = setting(
        "CREDIT_SWEEP_SECONDS",
        "How often the worker's beat credits recorded purchases the wallet has not confirmed (a crash, a caller"
        " that gave up); with the grace, a recorded purchase is credited within their sum",
        20.0,
        parse=float,
    )
    credit_sweep_grace_seconds: float = setting(
        "CREDIT_SWEEP_GRACE_SECONDS",
        "Age a recorded, uncredited purchase must reach before the sweep credits it (leaves live calls alone)",
        5.0,
        parse=float,
    )
    receipts_group_commit_window_ms: float = setting(
        "RECEIPTS_GROUP_COMMIT_WINDOW_MS",
        "Group commit: milliseconds concurrent purchases wait to share one database transaction and one"
        " wallet CreditPurchases call (0 = each purchase alone)",
        1.0,
        parse=float,
    )
    receipts_group_commit_max: int = setting(
        "RECEIPTS_GROUP_COMMIT_MAX", "Most purchases in one receipts group commit or CreditPurchases call", 128
    )

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.credit_sweep_seconds <= 0 or self.credit_sweep_grace_seconds < 0:
            problems.append("COINSTORE_CREDIT_SWEEP_SECONDS must be > 0 and the grace >= 0")
        if not 0 <= self.receipts_group_commit_window_ms <= 1000:
            problems.append("COINSTORE_RECEIPTS_GROUP_COMMIT_WINDOW_MS must be between 0 and 1000")
        if not 1 <= self.receipts_group_commit_max <= 1000:
            problems.append("COINSTORE_RECEIPTS_GROUP_COMMIT_MAX must be between 1 and 1000")
        if "*" in self.sandbox_accounts and len(self.sandbox_accounts) > 1:
            problems.append("COINSTORE_SANDBOX_ACCOUNTS: * (everyone) cannot be combined with account ids")
        if len(self.binding_secret) < 16:
            problems.append("COINSTORE_BINDING_SECRET: must be at least 16 characters")
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
