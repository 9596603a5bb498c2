"""Wires the wallet service: runtime, servicer, gRPC host."""

from __future__ import annotations

from datetime import timedelta

import grpc

from coinstore.wallet.v1 import wallet_service_pb2 as pb
from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc
from services.common.bootstrap import Runtime
from services.common.clock import Clock, SystemClock
from services.common.server import ServerOptions, ServiceHost
from services.wallet.config import WalletSettings
from services.wallet.servicer import WalletServiceServicer
from services.wallet.store import WalletStore

SERVICE = "wallet"


def build_host(
    settings: WalletSettings, runtime: Runtime, port: int | None = None, clock: Clock | None = None
) -> ServiceHost:
    store = WalletStore(
        runtime.database,
        runtime.catalog,
        clock or SystemClock(),
        reservation_ttl=timedelta(days=settings.wallet_reservation_ttl_days),
        failpoints=runtime.failpoints,
    )
    servicer = WalletServiceServicer(
        store,
        runtime.catalog,
        group_commit_window_seconds=settings.wallet_group_commit_window_ms / 1000,
        group_commit_max=settings.wallet_group_commit_max,
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_WalletServiceServicer_to_server(servicer, server)

    return ServiceHost(
        name=SERVICE,
        files=[pb.DESCRIPTOR],
        register=register,
        database=runtime.database,
        verifier=runtime.verifier,
        metrics=runtime.metrics,
        bind=f"{settings.bind_host}:{settings.wallet_grpc_port if port is None else port}",
        grace_seconds=settings.shutdown_grace_seconds,
        options=ServerOptions.from_settings(settings),
    )
