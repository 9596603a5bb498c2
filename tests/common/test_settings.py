"""Configuration: read once, typed, and every bad or missing variable named."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from services.cli.main import _settings_classes
from services.common.group_commit import Batching
from services.common.settings import CommonSettings, LogFormat, SettingsError, describe, load_settings, setting

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_no_environment() -> None:
    settings = load_settings(CommonSettings, {})
    assert settings.database_url.startswith("sqlite:///var/")
    assert settings.wallet_grpc_port == 50052
    assert settings.receipts_grpc_port == 50051
    assert settings.payouts_grpc_port == 50053
    assert settings.webhook_port == 8080
    assert settings.storesim_port == 8090
    assert settings.log_format is LogFormat.JSON


def test_settings_are_frozen() -> None:
    settings = load_settings(CommonSettings, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.wallet_grpc_port = 1  # type: ignore[misc]


def test_values_are_parsed() -> None:
    settings = load_settings(
        CommonSettings,
        {
            "COINSTORE_WALLET_GRPC_PORT": "6000",
            "COINSTORE_AUTH_TRUSTED_KEYS": "a.pem, b.pem",
            "COINSTORE_LOG_FORMAT": "TEXT",
        },
    )
    assert settings.wallet_grpc_port == 6000
    assert settings.auth_trusted_keys == (Path("a.pem"), Path("b.pem"))
    assert settings.log_format is LogFormat.TEXT


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("COINSTORE_WALLET_GRPC_PORT", "abc", "is not an integer"),
        ("COINSTORE_WEBHOOK_PORT", "70000", "is not a TCP port"),
        ("COINSTORE_LOG_FORMAT", "xml", "is not one of"),
        ("COINSTORE_LOG_LEVEL", "LOUD", "is not a log level"),
        ("COINSTORE_DB_POOL_SIZE", "0", "at least 1"),
    ],
)
def test_invalid_values_are_named(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(CommonSettings, {variable: value})
    assert variable in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COINSTORE_RECEIPTS_GROUP_COMMIT_WINDOW_MS", "-1"),
        ("COINSTORE_RECEIPTS_GROUP_COMMIT_MAX", "0"),
        ("COINSTORE_RECEIPTS_GROUP_COMMIT_LINGER_MS", "-1"),
        ("COINSTORE_RECEIPTS_GROUP_COMMIT_LINGER_MS", "1001"),
    ],
)
def test_receipts_group_commit_settings_out_of_range_are_named(variable: str, value: str) -> None:
    from services.receipts.config import ReceiptsSettings

    with pytest.raises(SettingsError) as caught:
        load_settings(ReceiptsSettings, {variable: value})
    assert f"{variable} must be between" in str(caught.value)


def test_receipts_group_commit_settings_make_the_purchase_path_batching() -> None:
    from services.receipts.config import ReceiptsSettings

    assert load_settings(ReceiptsSettings, {}).batching == Batching(0.001, 128, 0.008)
    tuned = {
        "COINSTORE_RECEIPTS_GROUP_COMMIT_WINDOW_MS": "0",
        "COINSTORE_RECEIPTS_GROUP_COMMIT_MAX": "1",
        "COINSTORE_RECEIPTS_GROUP_COMMIT_LINGER_MS": "0",
    }
    assert load_settings(ReceiptsSettings, tuned).batching == Batching(0.0, 1, 0.0)
    assert load_settings(ReceiptsSettings, {"COINSTORE_RECEIPTS_GROUP_COMMIT_LINGER_MS": "1000"}).batching == Batching(
        0.001, 128, 1.0
    )


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(CommonSettings, {"COINSTORE_WALLET_GRPC_PORT": "x", "COINSTORE_PAYOUTS_GRPC_PORT": "y"})
    assert "COINSTORE_WALLET_GRPC_PORT" in str(caught.value)
    assert "COINSTORE_PAYOUTS_GRPC_PORT" in str(caught.value)


def test_missing_required_setting_is_named() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Needs(CommonSettings):
        secret: str = setting("TEST_SECRET", "a required secret")

    with pytest.raises(SettingsError, match="COINSTORE_TEST_SECRET is required"):
        load_settings(Needs, {})


def test_readme_documents_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(COINSTORE_[A-Z0-9_]+)`", readme))
    missing = [row.env for cls in _settings_classes() for row in describe(cls) if row.env not in documented]
    assert not missing, f"README configuration table lacks {missing}"


def test_settings_print_secrets_as_stars() -> None:
    from services.payouts.config import PayoutsSettings

    shown = repr(
        PayoutsSettings(
            paypal_client_secret="hunter2-live-secret",
            database_url="postgresql://u:pw@db/x",
            payouts_database_url="postgresql://u:pw2@db/y",
        )
    )
    assert "hunter2" not in shown
    assert "pw" not in shown
    assert "paypal_client_secret=***" in shown
    assert "payout_chunk_size=1000" in shown
