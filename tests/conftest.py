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


SERVER_BROKERS = [pytest.param(kind, marks=pytest.mark.broker) for kind in env.SERVER_BROKERS]


@pytest.fixture(params=["embedded", *SERVER_BROKERS])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The embedded broker, Redis and RabbitMQ (from COINSTORE_TEST_BROKER_URL; in CI both must be there)."""
    if request.param == "embedded":
        return f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return env.server_broker_url(str(request.param))


@pytest.fixture(params=SERVER_BROKERS)
def server_broker_url(request: pytest.FixtureRequest) -> str:
    """Redis and RabbitMQ only: for suites that also run on PostgreSQL, where the
    embedded broker adds nothing the SQLite runs do not already cover."""
    return env.server_broker_url(str(request.param))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    directory = tmp_path / "auth"
    directory.mkdir()
    return make_keys(directory)


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return free_port()
