"""Fixtures of the receipts tests: a real receipts gRPC host in front of a fake
wallet that records every call (``receipts``) or in front of the real wallet
service (``real``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.receipts.support import Receipts, WalletReceipts, receipts_service, receipts_with_wallet
from tests.support.tokens import Keys


@pytest.fixture
async def receipts(keys: Keys, database_url: str, tmp_path: Path) -> AsyncIterator[Receipts]:
    async with receipts_service(keys, database_url, tmp_path) as service:
        yield service


@pytest.fixture
async def real(keys: Keys, database_url: str, tmp_path: Path) -> AsyncIterator[WalletReceipts]:
    async with receipts_with_wallet(keys, database_url, tmp_path) as service:
        yield service
