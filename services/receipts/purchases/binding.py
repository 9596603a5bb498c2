"""Purchase binding: the per-account values the app attaches to a purchase.

Both are HMAC-SHA256 of the account id under ``COINSTORE_BINDING_SECRET`` (with
a distinct label each), so they are stable per account, reveal nothing about the
account id, and cannot be forged for another account without the secret.

- App Store ``appAccountToken``: a UUID (version 4 layout) from the first 16 bytes.
- Play ``obfuscatedAccountId``: 43 characters of unpadded base64url (Play allows 64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid


class Binding:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, label: str, account_id: str) -> bytes:
        return hmac.new(self._key, f"{label}\x00{account_id}".encode(), hashlib.sha256).digest()

    def app_account_token(self, account_id: str) -> str:
        """StoreKit appAccountToken for the account (lower-case UUID string)."""
        return str(uuid.UUID(bytes=self._mac("appAccountToken", account_id)[:16], version=4))

    def obfuscated_account_id(self, account_id: str) -> str:
        """Play Billing obfuscatedAccountId for the account."""
        return base64.urlsafe_b64encode(self._mac("obfuscatedAccountId", account_id)).rstrip(b"=").decode()

    def app_account_token_matches(self, account_id: str, token: str) -> bool:
        """True when ``token`` (any UUID spelling) is this account's appAccountToken."""
        try:
            given = uuid.UUID(token)
        except ValueError:
            return False
        return hmac.compare_digest(given.bytes, uuid.UUID(self.app_account_token(account_id)).bytes)

    def obfuscated_account_id_matches(self, account_id: str, value: str) -> bool:
        """True when ``value`` is this account's obfuscatedAccountId."""
        return hmac.compare_digest(value.encode(), self.obfuscated_account_id(account_id).encode())
