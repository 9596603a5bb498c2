"""The system suite's fixtures: the whole system on PostgreSQL with Redis or
RabbitMQ (tests/system/harness.py), audited after every scenario, and the seed
that fixes a scenario's operation mix, fault order and failpoints."""

from __future__ import annotations

import os
import random
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support import env
from tests.support.databases import postgres_database
from tests.system.harness import System, running_system

SEED_VARIABLE = "COINSTORE_SYSTEM_SEED"
SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """``COINSTORE_SYSTEM_SEED`` when set (a replay), else a fresh one; a failing
    scenario prints it with the command that replays it."""
    raw = os.environ.get(SEED_VARIABLE, "")
    value = int(raw) if raw else random.SystemRandom().randrange(1, 2**31)
    request.node.stash[SEED_KEY] = value
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    seed = item.stash.get(SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(
            (
                "system seed",
                f"seed {seed}: replay with {SEED_VARIABLE}={seed} pytest '{item.nodeid}'",
            )
        )
    return report


@pytest.fixture(params=[pytest.param(kind, marks=pytest.mark.broker) for kind in env.SERVER_BROKERS])
def system_broker(request: pytest.FixtureRequest) -> str:
    return env.server_broker_url(str(request.param))


@pytest.fixture
def system_database() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def system(tmp_path: Path, system_database: str, system_broker: str) -> Iterator[System]:
    """Every process of the system on this test's own database and queues;
    `coinstore wallet audit` runs when the scenario ends."""
    with running_system(tmp_path / "system", system_database, system_broker) as running:
        yield running
