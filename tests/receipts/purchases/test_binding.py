"""Purchase binding values (purchases/binding.py): stable per account, distinct, not reversible."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from services.common.settings import SettingsError, load_settings
from services.receipts.config import ReceiptsSettings
from services.receipts.purchases.binding import Binding, RetiredSecret
from services.receipts.wiring import binding_from_settings


def test_binding_is_stable_distinct_and_not_reversible() -> None:
    binding = Binding("a-long-enough-secret-1")
    token = binding.app_account_token("acct-1")
    assert token == binding.app_account_token("acct-1")
    assert uuid.UUID(token).version == 4
    assert uuid.UUID(token).variant == uuid.RFC_4122
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


def test_binding_values_never_change() -> None:
    """Purchases bound in the wild are verified for months: the derivation is pinned."""
    binding = Binding("a-long-enough-secret-1")
    assert binding.app_account_token("acct-1") == "0c16c992-1ec3-4706-b44a-b410455d0e87"
    assert binding.obfuscated_account_id("acct-1") == "J2-ZkKRJvFhX6hOMKRe9DZeZwwYuYnQ1xIvqEDNG-YY"
    for n in range(64):
        token = uuid.UUID(binding.app_account_token(f"acct-{n}"))
        assert (token.version, token.variant) == (4, uuid.RFC_4122)


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.moment = now

    def now(self) -> datetime:
        return self.moment


def test_rotation_newest_derives_retired_verifies_for_its_keep_days() -> None:
    old, new = "the-old-binding-secret-1", "the-new-binding-secret-2"
    clock = FixedClock(datetime(2026, 11, 29, 12, tzinfo=UTC))
    retired = RetiredSecret(old, date(2026, 11, 1))
    binding = Binding(new, [retired], keep_days=180, clock=clock)
    before = Binding(old)
    old_token, old_obfuscated = before.app_account_token("fan-1"), before.obfuscated_account_id("fan-1")
    assert binding.app_account_token("fan-1") == Binding(new).app_account_token("fan-1") != old_token
    assert binding.obfuscated_account_id("fan-1") != old_obfuscated
    assert binding.app_account_token_matches("fan-1", old_token)
    assert binding.obfuscated_account_id_matches("fan-1", old_obfuscated)
    assert not binding.app_account_token_matches("fan-2", old_token)
    assert binding.expired() == []
    # The last moment of the 180 days still verifies; the next does not.
    clock.moment = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(days=180) - timedelta(microseconds=1)
    assert binding.app_account_token_matches("fan-1", old_token)
    clock.moment += timedelta(microseconds=1)
    assert not binding.app_account_token_matches("fan-1", old_token)
    assert not binding.obfuscated_account_id_matches("fan-1", old_obfuscated)
    assert binding.expired() == [retired]
    assert binding.app_account_token_matches("fan-1", binding.app_account_token("fan-1"))


def test_retired_secrets_setting_is_parsed_checked_and_secret() -> None:
    env = {
        "COINSTORE_BINDING_SECRET": "the-new-binding-secret-2",
        "COINSTORE_BINDING_RETIRED_SECRETS": "2026-11-01:the-old-binding-secret-1, 2026-06-01:an-older-secret-0000",
    }
    settings = load_settings(ReceiptsSettings, env)
    assert settings.binding_retired_secrets == (
        RetiredSecret("the-old-binding-secret-1", date(2026, 11, 1)),
        RetiredSecret("an-older-secret-0000", date(2026, 6, 1)),
    )
    assert "the-old-binding-secret-1" not in repr(settings)
    for bad, named in (
        ({"COINSTORE_BINDING_RETIRED_SECRETS": "the-old-binding-secret-1"}, "YYYY-MM-DD:secret"),
        ({"COINSTORE_BINDING_RETIRED_SECRETS": "2026-13-01:the-old-binding-secret-1"}, "not a date"),
        ({"COINSTORE_BINDING_RETIRED_SECRETS": "2026-11-01:short"}, "is short"),
        ({"COINSTORE_BINDING_RETIRED_SECRETS": "2026-11-01:the-new-binding-secret-2"}, "cannot also be retired"),
        ({"COINSTORE_BINDING_RETIRED_KEEP_DAYS": "90"}, "at least 180"),
    ):
        with pytest.raises(SettingsError, match=named):
            load_settings(ReceiptsSettings, {**env, **bad})


def test_start_up_names_expired_retired_secrets(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(
        ReceiptsSettings,
        {
            "COINSTORE_BINDING_SECRET": "the-new-binding-secret-2",
            "COINSTORE_BINDING_RETIRED_SECRETS": "2026-11-01:the-old-binding-secret-1,2026-01-02:an-older-secret-0000",
        },
    )
    with caplog.at_level(logging.WARNING, logger="services.receipts.wiring"):
        binding_from_settings(settings, FixedClock(datetime(2026, 11, 29, tzinfo=UTC)))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "retired 2026-01-02" in warnings[0]
    assert "an-older-secret" not in warnings[0]
