"""AIP-155 request ids on both databases: one claim wins, replays get the stored
response, a different body with the same id is refused."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.common.db import Database
from services.common.errors import RequestIdReused
from services.common.idempotency import RequestLog, request_log_table


@pytest.fixture
def log_db(database_url: str):
    metadata = sa.MetaData()
    table = request_log_table(metadata, "probe")
    database = Database.from_url(database_url, 12)
    metadata.create_all(database.engine)
    yield database, RequestLog(table)
    database.close()


def test_replay_returns_the_original_and_other_body_is_refused(log_db) -> None:
    database, log = log_db
    first = pb.GetBalanceRequest(account_id="a")
    answer = pb.GetBalanceResponse(balance=pb.Balance(account_id="a", coins=5))

    def claim_and_record(conn):
        assert log.claim(conn, "Get", "r1", first) is None
        log.record(conn, "Get", "r1", answer)

    database.transaction(claim_and_record)
    stored = database.transaction(lambda conn: log.claim(conn, "Get", "r1", first))
    assert stored is not None
    assert pb.GetBalanceResponse.FromString(stored) == answer
    with pytest.raises(RequestIdReused):
        database.transaction(lambda conn: log.claim(conn, "Get", "r1", pb.GetBalanceRequest(account_id="b")))


def test_concurrent_claims_of_one_id_admit_exactly_one(log_db) -> None:
    database, log = log_db
    request = pb.GetBalanceRequest(account_id="a")
    answer = pb.GetBalanceResponse(balance=pb.Balance(account_id="a", coins=1))
    winners: list[int] = []
    replays: list[bytes] = []
    barrier = threading.Barrier(10)

    def attempt(i: int) -> None:
        barrier.wait()

        def work(conn):
            stored = log.claim(conn, "Get", "same", request)
            if stored is None:
                winners.append(i)
                log.record(conn, "Get", "same", answer)
            else:
                replays.append(stored)

        database.transaction(work)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert len(replays) == 9
    assert all(pb.GetBalanceResponse.FromString(r) == answer for r in replays)
