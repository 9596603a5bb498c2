"""Purchase binding: the per-account values the app attaches to a purchase.

Both are HMAC-SHA256 of the account id under a binding secret (with a distinct
label each), so they are stable per account, reveal nothing about the account
id, and cannot be forged for another account without the secret.

- App Store ``appAccountToken``: a UUID (version 4 layout) from the first 16 bytes.
- Play ``obfuscatedAccountId``: 43 characters of unpadded base64url (Play allows 64).

Secrets rotate: only the newest (``COINSTORE_BINDING_SECRET``) derives new values;
verification also tries each retired secret until ``keep_days`` after its
retirement, since a purchase bound under it can be refunded for months.
"""

from __future__ import annotations

import base64
import hmac
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from services.common.clock import Clock, SystemClock

# The stores' refund windows: Apple refunds for months, Google up to 180 days.
MIN_KEEP_DAYS = 180


@dataclass(frozen=True)
class RetiredSecret:
    """A binding secret no longer used for new values, still verifying old ones."""

    secret: str
    retired_on: date

    def verifies_until(self, keep_days: int) -> datetime:
        return datetime.combine(self.retired_on, time(), UTC) + timedelta(days=keep_days)


def parse_retired_secrets(raw: str) -> tuple[RetiredSecret, ...]:
    """``YYYY-MM-DD:secret`` entries, comma-separated (the date the secret stopped deriving)."""
    entries = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        day, sep, secret = part.partition(":")
        if not sep or not secret:
            raise ValueError("each entry is YYYY-MM-DD:secret (the date it was retired)")
        try:
            retired_on = date.fromisoformat(day.strip())
        except ValueError:
            raise ValueError(f"{day.strip()!r} is not a date (YYYY-MM-DD)") from None
        entries.append(RetiredSecret(secret, retired_on))
    return tuple(entries)


class _Keyed:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def mac(self, label: str, account_id: str) -> bytes:
        return hmac.digest(self._key, f"{label}\x00{account_id}".encode(), "sha256")

    def app_account_token(self, account_id: str) -> bytes:
        return uuid.UUID(bytes=self.mac("appAccountToken", account_id)[:16], version=4).bytes

    def obfuscated_account_id(self, account_id: str) -> str:
        return base64.urlsafe_b64encode(self.mac("obfuscatedAccountId", account_id)).rstrip(b"=").decode()


class Binding:
    def __init__(
        self,
        secret: str,
        retired: Sequence[RetiredSecret] = (),
        *,
        keep_days: int = MIN_KEEP_DAYS,
        clock: Clock | None = None,
    ) -> None:
        self._newest = _Keyed(secret)
        self._retired = tuple((entry, _Keyed(entry.secret)) for entry in retired)
        self._keep_days = keep_days
        self._clock = clock or SystemClock()

    def expired(self) -> list[RetiredSecret]:
        """Retired secrets past their keep time: they verify nothing any more."""
        now = self._clock.now()
        return [entry for entry, _ in self._retired if entry.verifies_until(self._keep_days) <= now]

    def _verifying(self) -> Iterator[_Keyed]:
        """The newest secret, then (the clock read only if it is asked for more) the retired
        secrets still in their keep time."""
        yield self._newest
        now = self._clock.now()
        for entry, keyed in self._retired:
            if now < entry.verifies_until(self._keep_days):
                yield keyed

    def app_account_token(self, account_id: str) -> str:
        """StoreKit appAccountToken for the account (lower-case UUID string), under the newest secret."""
        return str(uuid.UUID(bytes=self._newest.app_account_token(account_id)))

    def obfuscated_account_id(self, account_id: str) -> str:
        """Play Billing obfuscatedAccountId for the account, under the newest secret."""
        return self._newest.obfuscated_account_id(account_id)

    def app_account_token_matches(self, account_id: str, token: str) -> bool:
        """True when ``token`` (any UUID spelling) is this account's appAccountToken under a verifying secret."""
        try:
            given = uuid.UUID(token).bytes
        except ValueError:
            return False
        return any(hmac.compare_digest(given, keyed.app_account_token(account_id)) for keyed in self._verifying())

    def obfuscated_account_id_matches(self, account_id: str, value: str) -> bool:
        """True when ``value`` is this account's obfuscatedAccountId under a verifying secret."""
        given = value.encode()
        return any(
            hmac.compare_digest(given, keyed.obfuscated_account_id(account_id).encode()) for keyed in self._verifying()
        )
