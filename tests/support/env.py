"""Which real servers the test run may use, and what to do when one is missing.

``COINSTORE_TEST_DATABASE_URL`` names the PostgreSQL server;
``COINSTORE_TEST_BROKER_URL`` (comma-separated) names a Redis and a RabbitMQ
broker. The PostgreSQL, Redis and RabbitMQ cases are always generated: locally
a missing or unreachable server skips them, with ``CI=true`` it fails them, so a
CI run can never pass by leaving a backend out.
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


# The server brokers every broker-backed suite runs on, by the URL schemes that name them.
SERVER_BROKERS = {"redis": ("redis://", "rediss://"), "rabbitmq": ("amqp://", "amqps://", "pyamqp://")}


def server_broker_url(kind: str) -> str:
    """The configured URL of a ``redis`` or ``rabbitmq`` broker, checked reachable
    (skips locally, fails in CI when it is missing or down)."""
    urls = [u for u in broker_urls() if u.startswith(SERVER_BROKERS[kind])]
    if not urls:
        unavailable(f"COINSTORE_TEST_BROKER_URL names no {kind} broker")
    url = urls[0]
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        unavailable(f"{kind} broker {url} is unreachable: {exc}")
    return url


def unavailable(what: str) -> None:
    """Skip locally, fail in CI: a CI run must never pass by skipping a backend."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: backend suites must not be skipped)")
    pytest.skip(what)
