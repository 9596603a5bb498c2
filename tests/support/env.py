"""Which real servers the test run may use, and what to do when one is missing.

``COINSTORE_TEST_DATABASE_URL`` switches the PostgreSQL suites on;
``COINSTORE_TEST_BROKER_URL`` (comma-separated) switches the Redis/RabbitMQ
suites on. With ``CI=true`` a configured server that cannot be reached fails
the test instead of skipping it.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def postgres_admin_url() -> str | None:
    return os.environ.get("COINSTORE_TEST_DATABASE_URL") or None


def broker_urls() -> list[str]:
    raw = os.environ.get("COINSTORE_TEST_BROKER_URL", "")
    return [u.strip() for u in raw.split(",") if u.strip()]


def unavailable(what: str) -> None:
    """Skip locally, fail in CI: a CI run must never pass by skipping a backend."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: backend suites must not be skipped)")
    pytest.skip(what)
