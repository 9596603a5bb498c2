"""Wires the payouts service: runtime, servicer, gRPC host."""

from __future__ import annotations

import grpc

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from services.common.bootstrap import Runtime
from services.common.server import ServiceHost
from services.payouts.config import PayoutsSettings
from services.payouts.servicer import PayoutServiceServicer

SERVICE = "payouts"


def build_host(settings: PayoutsSettings, runtime: Runtime, port: int | None = None) -> ServiceHost:
    servicer = PayoutServiceServicer()  # type: ignore[abstract]

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_PayoutServiceServicer_to_server(servicer, server)

    return ServiceHost(
        name=SERVICE,
        files=[pb.DESCRIPTOR],
        register=register,
        database=runtime.database,
        verifier=runtime.verifier,
        metrics=runtime.metrics,
        bind=f"{settings.bind_host}:{settings.payouts_grpc_port if port is None else port}",
        grace_seconds=settings.shutdown_grace_seconds,
    )
