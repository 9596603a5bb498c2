"""Shared fixtures: per-test databases (SQLite and, when configured, PostgreSQL),
caller keys, free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import env
from tests.support.databases import postgres_database, sqlite_database
from tests.support.ports import free_port
from tests.support.tokens import Keys, make_keys

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs the PostgreSQL server (COINSTORE_TEST_DATABASE_URL)")
    config.addinivalue_line("markers", "broker: needs a Redis or RabbitMQ broker (COINSTORE_TEST_BROKER_URL)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        with sqlite_database(tmp_path) as url:
            yield url
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with sqlite_database(tmp_path) as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["embedded", *[pytest.param(u, marks=pytest.mark.broker) for u in env.broker_urls()]])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The embedded broker, plus every server broker named in COINSTORE_TEST_BROKER_URL."""
    if request.param == "embedded":
        return f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return str(request.param)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    directory = tmp_path / "auth"
    directory.mkdir()
    return make_keys(directory)


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return free_port()
