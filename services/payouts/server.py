"""Wires the payouts service: runtime, domain, servicer, gRPC host."""

from __future__ import annotations

import grpc
from prometheus_client import Gauge

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from services.common.bootstrap import Runtime
from services.common.celery_app import make_celery_app
from services.common.clock import Clock, SystemClock
from services.common.server import ServerOptions, ServiceHost
from services.payouts.config import PayoutsSettings
from services.payouts.domain.ports import PayoutProvider, WalletPort
from services.payouts.servicer import PayoutServiceServicer
from services.payouts.wiring import CeleryQueue, build_domain

SERVICE = "payouts"


def build_host(
    settings: PayoutsSettings,
    runtime: Runtime,
    port: int | None = None,
    *,
    clock: Clock | None = None,
    provider: PayoutProvider | None = None,
    wallet: WalletPort | None = None,
) -> ServiceHost:
    app = make_celery_app(SERVICE, settings.broker_url)
    queue = CeleryQueue(app, settings.payout_queue)
    payouts, _pipeline = build_domain(
        settings,
        runtime.database,
        runtime.catalog,
        queue,
        clock or SystemClock(),
        provider=provider,
        wallet=wallet,
        failpoints=runtime.failpoints,
    )
    servicer = PayoutServiceServicer(payouts, runtime.database)
    parked = Gauge(
        "coinstore_payouts_parked_submissions",
        "Provider submissions parked for ops review after ambiguous answers (alert when above 0)",
        registry=runtime.metrics.registry,
    )
    parked.set_function(payouts.parked)

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
        options=ServerOptions.from_settings(settings),
    )
