"""Fixtures of the wallet tests: a running wallet server per test, on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.tokens import Keys
from tests.wallet.support import Wallet, running_wallet


@pytest.fixture
async def wallet(database_url: str, keys: Keys, tmp_path: Path) -> AsyncIterator[Wallet]:
    async with running_wallet(database_url, keys, tmp_path) as running:
        yield running
