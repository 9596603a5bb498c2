"""Purchase binding values (purchases/binding.py): stable per account, distinct, not reversible."""

from __future__ import annotations

import uuid

from services.receipts.purchases.binding import Binding


def test_binding_is_stable_distinct_and_not_reversible() -> None:
    binding = Binding("a-long-enough-secret-1")
    token = binding.app_account_token("acct-1")
    assert token == binding.app_account_token("acct-1")
    assert uuid.UUID(token).version == 4
    assert token != binding.app_account_token("acct-2")
    assert token != Binding("a-long-enough-secret-2").app_account_token("acct-1")
    assert binding.app_account_token_matches("acct-1", token.upper())
    assert not binding.app_account_token_matches("acct-2", token)
    assert not binding.app_account_token_matches("acct-1", "not-a-uuid")
    obfuscated = binding.obfuscated_account_id("acct-1")
    assert len(obfuscated) <= 64
    assert "acct" not in obfuscated
    assert binding.obfuscated_account_id_matches("acct-1", obfuscated)
    assert not binding.obfuscated_account_id_matches("acct-2", obfuscated)
