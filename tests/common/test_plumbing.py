"""The shared plumbing through a real gRPC server on a real socket: health,
reflection, authentication, authorization, error mapping, request ids, metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.common import errors
from services.common.db import Database
from services.common.metrics import Metrics
from services.common.server import ServerOptions
from tests.support.faultproxy import Mode, fault_proxy
from tests.support.grpc_server import running_host
from tests.support.status import bad_field, error_info
from tests.support.tokens import Keys

# Each account id makes the test servicer raise one kind of error.
RAISES: dict[str, Exception] = {
    "invalid": errors.InvalidArgument("account_id", "must not be empty"),
    "precondition": errors.FailedPrecondition("INSUFFICIENT_COINS", "not enough coins"),
    "denied": errors.PermissionDenied("RECEIPT_BOUND_TO_OTHER_ACCOUNT", "bound to another account"),
    "unauthenticated": errors.Unauthenticated("INVALID_CREDENTIALS", "bad"),
    "missing": errors.NotFound("ACCOUNT_NOT_FOUND", "no such account"),
    "exists": errors.AlreadyExists("ALREADY_EXISTS", "exists"),
    "conflict": errors.Aborted("CONCURRENT_MODIFICATION", "retry"),
    "down": errors.Unavailable("STORE_UNAVAILABLE", "the store is down"),
    "quota": errors.ResourceExhausted("RATE_LIMITED", "slow down"),
    "reused": errors.RequestIdReused("r-1"),
    "bug": ZeroDivisionError("secret internal detail"),
    "db-gone": sa.exc.OperationalError("SELECT 1", {}, ConnectionResetError("server closed the connection")),
}


class ProbeServicer(pb_grpc.WalletServiceServicer):
    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.GetBalanceResponse:
        if request.account_id == "slow":
            await asyncio.sleep(0.5)
        if request.account_id in RAISES:
            raise RAISES[request.account_id]
        return pb.GetBalanceResponse(balance=pb.Balance(account_id=request.account_id, coins=7))


@pytest.fixture
async def server(keys: Keys, sqlite_url: str) -> AsyncIterator[tuple[int, Metrics]]:
    database = Database.from_url(sqlite_url, 2)
    metrics = Metrics("probe")

    def register(srv: grpc.aio.Server) -> None:
        pb_grpc.add_WalletServiceServicer_to_server(ProbeServicer(), srv)  # type: ignore[abstract]

    async with running_host(
        name="probe",
        files=[pb.DESCRIPTOR],
        register=register,
        database=database,
        public_key=keys.public_path,
        metrics=metrics,
        options=ServerOptions(reflection=True),
    ) as host:
        yield host.port, metrics
    database.close()


@pytest.fixture
async def stub(server: tuple[int, Metrics]) -> AsyncIterator[pb_grpc.WalletServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[0]}") as channel:
        yield pb_grpc.WalletServiceStub(channel)


async def test_health_serving_once_database_reachable(server: tuple[int, Metrics]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[0]}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "coinstore.wallet.v1.WalletService"):
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def _await_health(health: health_pb2_grpc.HealthStub, want: int, timeout: float = 30) -> None:
    """Follow the Watch stream of the overall health until it reports ``want``."""

    async def follow() -> None:
        async for reply in health.Watch(health_pb2.HealthCheckRequest()):
            if reply.status == want:
                return

    await asyncio.wait_for(follow(), timeout)


async def test_health_follows_the_database_down_and_up(keys: Keys, postgres_url: str) -> None:
    """SERVING -> NOT_SERVING when PostgreSQL stops answering -> SERVING when it is back."""
    url = sa.engine.make_url(postgres_url)
    with fault_proxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        database = Database.from_url(url.set(port=proxy.port).render_as_string(hide_password=False), 1)

        def register(srv: grpc.aio.Server) -> None:
            pb_grpc.add_WalletServiceServicer_to_server(ProbeServicer(), srv)  # type: ignore[abstract]

        try:
            async with (
                running_host(
                    name="probe",
                    files=[pb.DESCRIPTOR],
                    register=register,
                    database=database,
                    public_key=keys.public_path,
                    health_check_seconds=0.2,
                ) as host,
                grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel,
            ):
                health = health_pb2_grpc.HealthStub(channel)
                await _await_health(health, health_pb2.HealthCheckResponse.SERVING)
                proxy.set_mode(Mode.RESET)
                await _await_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
                service = health_pb2.HealthCheckRequest(service="coinstore.wallet.v1.WalletService")
                assert (await health.Check(service)).status == health_pb2.HealthCheckResponse.NOT_SERVING
                proxy.set_mode(Mode.PASS)
                await _await_health(health, health_pb2.HealthCheckResponse.SERVING)
                assert (await health.Check(service)).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            database.close()


async def test_reflection_lists_the_service(server: tuple[int, Metrics]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[0]}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for reply in call:
            names = {s.name for s in reply.list_services_response.service}
            break
    assert "coinstore.wallet.v1.WalletService" in names
    assert "grpc.health.v1.Health" in names


async def test_no_token_is_unauthenticated(stub: pb_grpc.WalletServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(pb.GetBalanceRequest(account_id="a"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MISSING_CREDENTIALS"


@pytest.mark.parametrize("kind", ["garbage", "foreign-key", "expired", "hs256", "wrong-audience"])
async def test_bad_token_is_unauthenticated(
    stub: pb_grpc.WalletServiceAsyncStub, keys: Keys, tmp_path: Any, kind: str
) -> None:
    import time

    import jwt

    from tests.support.tokens import make_keys

    now = int(time.time())
    claims = {"aud": "coinstore", "sub": "x", "scope": "wallet:read", "exp": now + 600}
    if kind == "garbage":
        token = "not-a-jwt"
    elif kind == "foreign-key":
        (tmp_path / "other").mkdir()
        token = make_keys(tmp_path / "other").token(["wallet:read"])
    elif kind == "expired":
        token = jwt.encode({**claims, "exp": now - 3600}, keys.private_key, algorithm="ES256")
    elif kind == "hs256":
        token = jwt.encode(claims, "shared-secret-that-is-long-enough-for-hs256", algorithm="HS256")
    else:
        token = jwt.encode({**claims, "aud": "someone-else"}, keys.private_key, algorithm="ES256")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(
            pb.GetBalanceRequest(account_id="a"), metadata=(("authorization", f"Bearer {token}"),), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_scope_is_permission_denied(stub: pb_grpc.WalletServiceAsyncStub, keys: Keys) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(pb.GetBalanceRequest(account_id="a"), metadata=keys.metadata("wallet:gift"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(caught.value)
    assert info.reason == "MISSING_SCOPE"
    assert info.metadata["required_scope"] == "wallet:read"


async def test_right_scope_succeeds(stub: pb_grpc.WalletServiceAsyncStub, keys: Keys) -> None:
    reply = await stub.GetBalance(
        pb.GetBalanceRequest(account_id="a"), metadata=keys.metadata("wallet:read"), timeout=5
    )
    assert reply.balance.coins == 7


@pytest.mark.parametrize(
    ("account", "code", "reason"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("precondition", grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_COINS"),
        ("denied", grpc.StatusCode.PERMISSION_DENIED, "RECEIPT_BOUND_TO_OTHER_ACCOUNT"),
        ("unauthenticated", grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS"),
        ("missing", grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
        ("exists", grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        ("conflict", grpc.StatusCode.ABORTED, "CONCURRENT_MODIFICATION"),
        ("down", grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
        ("quota", grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        ("reused", grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED"),
        ("bug", grpc.StatusCode.INTERNAL, "INTERNAL"),
        ("db-gone", grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    ],
)
async def test_error_mapping(
    stub: pb_grpc.WalletServiceAsyncStub, keys: Keys, account: str, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(
            pb.GetBalanceRequest(account_id=account), metadata=keys.metadata("wallet:read"), timeout=5
        )
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason
    assert info.domain == "coinstore"


async def test_invalid_argument_names_the_field(stub: pb_grpc.WalletServiceAsyncStub, keys: Keys) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(pb.GetBalanceRequest(account_id="invalid"), metadata=keys.metadata("wallet:read"))
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [v.field for v in bad.field_violations]
    assert violations == ["account_id"]
    assert "account_id" in (caught.value.details() or "")


async def test_unexpected_error_hides_its_detail(
    stub: pb_grpc.WalletServiceAsyncStub, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(pb.GetBalanceRequest(account_id="bug"), metadata=keys.metadata("wallet:read"))
    assert caught.value.details() == "internal error"
    assert "secret internal detail" not in str(caught.value)
    assert any("secret internal detail" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_request_id_is_propagated(stub: pb_grpc.WalletServiceAsyncStub, keys: Keys) -> None:
    call = stub.GetBalance(
        pb.GetBalanceRequest(account_id="a"),
        metadata=(*keys.metadata("wallet:read"), ("x-request-id", "req-123")),
    )
    await call
    trailing = dict(await call.trailing_metadata())  # type: ignore[arg-type]
    assert trailing["x-request-id"] == "req-123"


async def test_unimplemented_rpc_still_requires_auth(stub: pb_grpc.WalletServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListGifts(pb.ListGiftsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_metrics_count_calls_and_reasons(
    server: tuple[int, Metrics], stub: pb_grpc.WalletServiceAsyncStub, keys: Keys, free_port: int
) -> None:
    metrics = server[1]
    await stub.GetBalance(pb.GetBalanceRequest(account_id="a"), metadata=keys.metadata("wallet:read"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetBalance(pb.GetBalanceRequest(account_id="precondition"), metadata=keys.metadata("wallet:read"))
    port = metrics.serve("127.0.0.1", free_port)
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    assert 'coinstore_rpc_requests_total{code="OK",method="GetBalance",service="probe"} 1.0' in body
    assert 'coinstore_rpc_errors_total{method="GetBalance",reason="INSUFFICIENT_COINS",service="probe"} 1.0' in body
    assert "coinstore_rpc_duration_seconds_bucket" in body


async def test_stop_drains_in_flight_calls_and_refuses_new_ones(keys: Keys, sqlite_url: str) -> None:
    database = Database.from_url(sqlite_url, 2)

    def register(srv: grpc.aio.Server) -> None:
        pb_grpc.add_WalletServiceServicer_to_server(ProbeServicer(), srv)  # type: ignore[abstract]

    async with (
        running_host(
            name="probe", files=[pb.DESCRIPTOR], register=register, database=database, public_key=keys.public_path
        ) as host,
        grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel,
    ):
        stub = pb_grpc.WalletServiceStub(channel)
        in_flight = asyncio.ensure_future(
            stub.GetBalance(pb.GetBalanceRequest(account_id="slow"), metadata=keys.metadata("wallet:read"))
        )
        await asyncio.sleep(0.1)
        await host.stop()
        reply = await in_flight
        assert reply.balance.account_id == "slow"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(
                pb.GetBalanceRequest(account_id="a"), metadata=keys.metadata("wallet:read"), timeout=2
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    database.close()


GET_BALANCE = "/coinstore.wallet.v1.WalletService/GetBalance"
# Field 1 (account_id) announced as 255 bytes long, with 2 bytes following: not a protobuf message.
GARBAGE = b"\x0a\xff\x01ab"


async def test_garbage_from_an_authenticated_caller_is_invalid_argument(
    server: tuple[int, Metrics], keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[0]}") as channel:
        raw = channel.unary_unary(GET_BALANCE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(GARBAGE, metadata=keys.metadata("wallet:read"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "MALFORMED_REQUEST"
        assert bad_field(caught.value) == "request"
        # The service is unharmed and nothing was logged as a crash.
        reply = await pb_grpc.WalletServiceStub(channel).GetBalance(
            pb.GetBalanceRequest(account_id="a"), metadata=keys.metadata("wallet:read"), timeout=5
        )
        assert reply.balance.coins == 7
    assert not [r for r in caplog.records if r.exc_info]


async def test_garbage_from_an_unauthenticated_caller_is_unauthenticated(server: tuple[int, Metrics]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[0]}") as channel:
        raw = channel.unary_unary(GET_BALANCE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(GARBAGE, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == "MISSING_CREDENTIALS"


@pytest.mark.parametrize(
    ("account_id", "field"),
    [("fan\x00x", "account_id"), ("fan\n", "account_id"), ("\x1b[31mred", "account_id")],
)
async def test_control_characters_in_any_text_field_are_refused(
    stub: pb_grpc.WalletServiceAsyncStub, keys: Keys, account_id: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(pb.GetBalanceRequest(account_id=account_id), metadata=keys.metadata("wallet:read"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field(caught.value) == field


async def test_nested_and_repeated_fields_are_checked_too(server: tuple[int, Metrics], keys: Keys) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[0]}") as channel:
        raw = channel.unary_unary(
            "/coinstore.wallet.v1.WalletService/ListTransactions",
            request_serializer=pb.ListTransactionsRequest.SerializeToString,
            response_deserializer=pb.ListTransactionsResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(
                pb.ListTransactionsRequest(account_id="a", kinds=[pb.TRANSACTION_KIND_PURCHASE] * 20_001),
                metadata=keys.metadata("wallet:read"),
            )
        assert (caught.value.code(), bad_field(caught.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "kinds")
        settle = channel.unary_unary(
            "/coinstore.wallet.v1.WalletService/SetSpendingLimit",
            request_serializer=pb.SetSpendingLimitRequest.SerializeToString,
            response_deserializer=pb.SetSpendingLimitResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await settle(pb.SetSpendingLimitRequest(request_id="r\x00"), metadata=keys.metadata("wallet:limits"))
        assert bad_field(caught.value) == "request_id"
        # A control character inside a message nested in a repeated message.
        batch = channel.unary_unary(
            "/coinstore.wallet.v1.WalletService/CreditPurchases",
            request_serializer=pb.CreditPurchasesRequest.SerializeToString,
            response_deserializer=pb.CreditPurchasesResponse.FromString,
        )
        items = [
            pb.CreditPurchaseRequest(request_id="r1", price=money_pb2.Money(currency_code="USD")),
            pb.CreditPurchaseRequest(request_id="r2", price=money_pb2.Money(currency_code="US\nD")),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await batch(pb.CreditPurchasesRequest(requests=items), metadata=keys.metadata("wallet:credit"))
        assert (caught.value.code(), bad_field(caught.value)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "requests[1].price.currency_code",
        )


async def test_oversized_messages_and_too_many_calls_are_resource_exhausted(keys: Keys, sqlite_url: str) -> None:
    database = Database.from_url(sqlite_url, 2)

    def register(srv: grpc.aio.Server) -> None:
        pb_grpc.add_WalletServiceServicer_to_server(ProbeServicer(), srv)  # type: ignore[abstract]

    options = ServerOptions(max_concurrent_rpcs=2, max_message_bytes=64 * 1024)
    async with (
        running_host(
            name="probe",
            files=[pb.DESCRIPTOR],
            register=register,
            database=database,
            public_key=keys.public_path,
            options=options,
        ) as host,
        grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel,
    ):
        stub = pb_grpc.WalletServiceStub(channel)
        md = keys.metadata("wallet:read")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(pb.GetBalanceRequest(account_id="x" * 100_000), metadata=md)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow = [
            asyncio.ensure_future(stub.GetBalance(pb.GetBalanceRequest(account_id="slow"), metadata=md))
            for _ in range(2)
        ]
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(pb.GetBalanceRequest(account_id="a"), metadata=md)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [r.balance.account_id for r in await asyncio.gather(*slow)] == ["slow", "slow"]
        # The server is unharmed.
        assert (await stub.GetBalance(pb.GetBalanceRequest(account_id="a"), metadata=md)).balance.coins == 7
    database.close()


async def test_reflection_is_opt_in(keys: Keys, sqlite_url: str) -> None:
    database = Database.from_url(sqlite_url, 2)

    def register(srv: grpc.aio.Server) -> None:
        pb_grpc.add_WalletServiceServicer_to_server(ProbeServicer(), srv)  # type: ignore[abstract]

    async with (
        running_host(
            name="probe", files=[pb.DESCRIPTOR], register=register, database=database, public_key=keys.public_path
        ) as host,
        grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    database.close()


def test_service_sessions_have_a_statement_timeout_and_never_log_parameters(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    bounded = Database.from_url(postgres_url, 1, statement_timeout_ms=200)
    unbounded = Database.from_url(postgres_url, 1)
    try:
        with pytest.raises(sa.exc.OperationalError) as caught:
            bounded.transaction(lambda conn: conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": 2}))
        assert "statement timeout" in str(caught.value)
        assert "'s': 2" not in str(caught.value)  # bound parameters stay out of errors and logs
        unbounded.transaction(lambda conn: conn.execute(sa.text("SELECT pg_sleep(0.3)")))
    finally:
        bounded.close()
        unbounded.close()
