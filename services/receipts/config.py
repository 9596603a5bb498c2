"""Settings of the receipts service (environment variables are read here and in
services.common.settings only)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.common.group_commit import Batching
from services.common.settings import PREFIX, CommonSettings, SettingsError, setting
from services.receipts.purchases.binding import MIN_KEEP_DAYS, RetiredSecret, parse_retired_secrets


class TokenlessPolicy(enum.Enum):
    """Who owns an App Store purchase without appAccountToken (and every legacy-receipt purchase)."""

    FIRST_CLAIMER = "first-claimer"
    REFUSE = "require-token"


class RegionPolicy(enum.Enum):
    ALLOW = "allow"
    FLAG = "flag"
    REFUSE = "refuse"


@dataclass(frozen=True, kw_only=True, repr=False)
class ReceiptsSettings(CommonSettings):
    """Everything the receipts service reads from the environment."""

    SERVICE: ClassVar[str] = "receipts"

    binding_secret: str = setting(
        "BINDING_SECRET",
        "Server secret the per-account appAccountToken / obfuscatedAccountId are derived with",
        "dev-binding-secret-change-me",
        secret=True,
    )
    binding_retired_secrets: tuple[RetiredSecret, ...] = setting(
        "BINDING_RETIRED_SECRETS",
        "Former binding secrets as YYYY-MM-DD:secret (the day each stopped deriving), comma-separated: they still"
        " verify purchases bound under them for COINSTORE_BINDING_RETIRED_KEEP_DAYS",
        (),
        parse=parse_retired_secrets,
        secret=True,
    )
    binding_retired_keep_days: int = setting(
        "BINDING_RETIRED_KEEP_DAYS",
        "Days a retired binding secret keeps verifying after its retirement (at least 180: the stores' refund windows)",
        MIN_KEEP_DAYS,
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
    apple_tokenless_purchases: TokenlessPolicy = setting(
        "APPLE_TOKENLESS_PURCHASES",
        "App Store purchases without appAccountToken (legacy receipts never have one): first-claimer (the first account"
        " to verify one owns it) or require-token (refused with APP_ACCOUNT_TOKEN_REQUIRED)",
        TokenlessPolicy.FIRST_CLAIMER,
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
    pubsub_jwks_failure_cooldown_seconds: float = setting(
        "PUBSUB_JWKS_FAILURE_COOLDOWN_SECONDS",
        "Seconds after a failed Pub/Sub JWKS fetch before the next try (the keys held meanwhile keep verifying)",
        30.0,
        parse=float,
    )
    pubsub_audience: str = setting(
        "PUBSUB_AUDIENCE", "Expected aud of Pub/Sub push tokens", "http://127.0.0.1:8080/notifications/google"
    )
    pubsub_service_account: str = setting(
        "PUBSUB_SERVICE_ACCOUNT",
        "Expected email of Pub/Sub push tokens",
        "pubsub-push@coinstore-dev.iam.gserviceaccount.com",
    )
    webhook_max_body_bytes: int = setting(
        "WEBHOOK_MAX_BODY_BYTES", "Largest webhook body accepted (413 beyond)", 1024 * 1024
    )
    webhook_max_json_depth: int = setting(
        "WEBHOOK_MAX_JSON_DEPTH", "Deepest nesting of a webhook's JSON accepted (400 beyond)", 32
    )
    webhook_read_timeout_seconds: float = setting(
        "WEBHOOK_READ_TIMEOUT_SECONDS", "Time a sender gets to send a webhook body (408 after)", 10.0, parse=float
    )
    webhook_max_concurrent_requests: int = setting(
        "WEBHOOK_MAX_CONCURRENT_REQUESTS",
        "Notifications the webhook handles at once; beyond it 503 with Retry-After (the stores retry)",
        64,
    )
    apple_notification_max_age_hours: float = setting(
        "APPLE_NOTIFICATION_MAX_AGE_HOURS",
        "Apple notifications signed longer ago are refused at the webhook (403; Apple retries for about 6.5 days,"
        " so at least 168); stored ones and reconciliation are not affected",
        168.0,
        parse=float,
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
    notifications_refund_retry_days: float = setting(
        "NOTIFICATIONS_REFUND_RETRY_DAYS",
        "Days a failing refund, refund-reversed or voided-purchase notification is retried before it goes dead"
        " (at least 7: the stores redeliver for about as long)",
        7.0,
        parse=float,
    )
    notifications_refund_retry_cap_seconds: float = setting(
        "NOTIFICATIONS_REFUND_RETRY_CAP_SECONDS",
        "Longest wait between two attempts of a failing refund notification (the sweeper re-queues it when due)",
        3600.0,
        parse=float,
    )
    reconcile_seconds: float = setting(
        "RECONCILE_SECONDS",
        "How often Celery beat runs reconciliation (each run resumes where the last stopped)",
        900.0,
        parse=float,
    )
    reconcile_promise_hours: float = setting(
        "RECONCILE_PROMISE_HOURS",
        "M: every refund of a purchase younger than N days is looked at within M hours of the store listing it"
        " (coinstore_reconcile_unchecked_age_seconds stays below it)",
        6.0,
        parse=float,
    )
    reconcile_apple_days: int = setting(
        "RECONCILE_APPLE_DAYS", "N for the App Store: days of Get Notification History reconciled (at most 180)", 180
    )
    reconcile_google_days: int = setting(
        "RECONCILE_GOOGLE_DAYS", "N for Google Play: days of voided purchases reconciled (at most 30)", 30
    )
    reconcile_overlap_hours: float = setting(
        "RECONCILE_OVERLAP_HOURS",
        "How far each reconciliation window reaches back into the last one (records the stores list late)",
        24.0,
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
    receipts_group_commit_linger_ms: float = setting(
        "RECEIPTS_GROUP_COMMIT_LINGER_MS",
        "Group commit under load: milliseconds the next batch of each step fills after a batch ends,"
        " when purchases are already waiting (0 = it goes at once)",
        8.0,
        parse=float,
    )

    @property
    def batching(self) -> Batching:
        """The group commit of the purchase path's steps (record, CreditPurchases, mark)."""
        return Batching(
            self.receipts_group_commit_window_ms / 1000,
            self.receipts_group_commit_max,
            self.receipts_group_commit_linger_ms / 1000,
        )

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        dev_secret = self.__dataclass_fields__["binding_secret"].default
        if self.binding_secret == dev_secret:
            problems.append(f"{PREFIX}BINDING_SECRET is the development secret: anyone could forge bindings")
        if any(retired.secret == dev_secret for retired in self.binding_retired_secrets):
            problems.append(f"{PREFIX}BINDING_RETIRED_SECRETS holds the development secret")
        if "*" in self.sandbox_accounts:
            problems.append(
                f"{PREFIX}SANDBOX_ACCOUNTS is *: Sandbox purchases would be credited to everyone; list the accounts"
            )
        for name in ("apple_api_url", "apple_sandbox_api_url", "pubsub_jwks_url"):
            problems.append(self.url_problem(name.upper(), getattr(self, name)) or "")
        if self.google_api_endpoint:
            problems.append(self.url_problem("GOOGLE_API_ENDPOINT", self.google_api_endpoint) or "")
        for name in ("apple_api_key_file", "google_service_account_file"):
            if self.at_default(name) or "storesim" in getattr(self, name).parts:
                problems.append(f"{PREFIX}{name.upper()} is the store simulator's {getattr(self, name)}")
        for root in self.apple_root_certs:
            if self.at_default("apple_root_certs") or "storesim" in root.parts:
                problems.append(f"{PREFIX}APPLE_ROOT_CERTS trusts the store simulator's root {root}")
        problems.append(self._token_uri_problem() or "")
        return [problem for problem in problems if problem]

    def _token_uri_problem(self) -> str | None:
        """The service account's token_uri is where its signed assertion goes: https, never the simulator."""
        try:
            text = self.google_service_account_file.read_text()
        except OSError:  # not mounted where this is judged; the Play client names it when used
            return None
        try:
            token_uri = json.loads(text).get("token_uri", "")
        except (ValueError, AttributeError) as exc:
            return f"{PREFIX}GOOGLE_SERVICE_ACCOUNT_FILE is not a service-account key: {exc}"
        return self.url_problem("GOOGLE_SERVICE_ACCOUNT_FILE's token_uri", str(token_uri))

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.credit_sweep_seconds <= 0 or self.credit_sweep_grace_seconds < 0:
            problems.append("COINSTORE_CREDIT_SWEEP_SECONDS must be > 0 and the grace >= 0")
        if not 0 <= self.receipts_group_commit_window_ms <= 1000:
            problems.append("COINSTORE_RECEIPTS_GROUP_COMMIT_WINDOW_MS must be between 0 and 1000")
        if not 1 <= self.receipts_group_commit_max <= 1000:
            problems.append("COINSTORE_RECEIPTS_GROUP_COMMIT_MAX must be between 1 and 1000")
        if not 0 <= self.receipts_group_commit_linger_ms <= 1000:
            problems.append("COINSTORE_RECEIPTS_GROUP_COMMIT_LINGER_MS must be between 0 and 1000")
        if "*" in self.sandbox_accounts and len(self.sandbox_accounts) > 1:
            problems.append("COINSTORE_SANDBOX_ACCOUNTS: * (everyone) cannot be combined with account ids")
        if self.notifications_refund_retry_days < 7:
            problems.append("COINSTORE_NOTIFICATIONS_REFUND_RETRY_DAYS: must be at least 7")
        if not 1 <= self.reconcile_apple_days <= 180:
            problems.append("COINSTORE_RECONCILE_APPLE_DAYS: must be 1 to 180 (Get Notification History's limit)")
        if not 1 <= self.reconcile_google_days <= 30:
            problems.append("COINSTORE_RECONCILE_GOOGLE_DAYS: must be 1 to 30 (voidedpurchases.list's limit)")
        if not 0 < self.reconcile_seconds < self.reconcile_promise_hours * 3600 / 2:
            problems.append(
                "COINSTORE_RECONCILE_SECONDS: must be positive and under half of COINSTORE_RECONCILE_PROMISE_HOURS"
                " (a failed run must leave time for the next within the promise)"
            )
        if len(self.binding_secret) < 16:
            problems.append("COINSTORE_BINDING_SECRET: must be at least 16 characters")
        for retired in self.binding_retired_secrets:
            if len(retired.secret) < 16:
                problems.append(f"COINSTORE_BINDING_RETIRED_SECRETS: the secret retired {retired.retired_on} is short")
            if retired.secret == self.binding_secret:
                problems.append("COINSTORE_BINDING_RETIRED_SECRETS: the newest secret cannot also be retired")
        if self.webhook_max_body_bytes < 64 * 1024:
            problems.append("COINSTORE_WEBHOOK_MAX_BODY_BYTES must be at least 65536 (a notification with its JWS)")
        if not 8 <= self.webhook_max_json_depth <= 512:
            problems.append("COINSTORE_WEBHOOK_MAX_JSON_DEPTH must be between 8 and 512")
        if self.webhook_read_timeout_seconds <= 0:
            problems.append("COINSTORE_WEBHOOK_READ_TIMEOUT_SECONDS must be positive")
        if self.webhook_max_concurrent_requests < 1:
            problems.append("COINSTORE_WEBHOOK_MAX_CONCURRENT_REQUESTS must be at least 1")
        if self.apple_notification_max_age_hours < 168:
            problems.append(
                "COINSTORE_APPLE_NOTIFICATION_MAX_AGE_HOURS must be at least 168: Apple retries for about 6.5 days"
            )
        if self.binding_retired_keep_days < MIN_KEEP_DAYS:
            problems.append(
                f"COINSTORE_BINDING_RETIRED_KEEP_DAYS must be at least {MIN_KEEP_DAYS} (refunds come for months)"
            )
        if problems:
            raise SettingsError("invalid configuration: " + "; ".join(problems))
