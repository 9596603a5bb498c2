"""Wires the receipts service: components, servicer, gRPC host."""

from __future__ import annotations

import grpc

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc
from services.common.bootstrap import Runtime
from services.common.server import ServerOptions, ServiceHost
from services.receipts.components import SERVICE, Components, build_components
from services.receipts.config import ReceiptsSettings
from services.receipts.servicer import ReceiptServiceServicer

__all__ = ["SERVICE", "build_host", "build_host_with"]


def build_host(settings: ReceiptsSettings, runtime: Runtime, port: int | None = None) -> ServiceHost:
    """The receipts gRPC host; call inside a running event loop."""
    return build_host_with(build_components(settings, runtime), runtime, port)


def build_host_with(components: Components, runtime: Runtime, port: int | None = None) -> ServiceHost:
    """The gRPC host over already-built components (shared with a webhook server)."""
    settings = components.settings
    servicer = ReceiptServiceServicer(components)  # type: ignore[abstract]

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_ReceiptServiceServicer_to_server(servicer, server)

    return ServiceHost(
        name=SERVICE,
        files=[pb.DESCRIPTOR],
        register=register,
        database=runtime.database,
        verifier=runtime.verifier,
        metrics=runtime.metrics,
        bind=f"{settings.bind_host}:{settings.receipts_grpc_port if port is None else port}",
        grace_seconds=settings.shutdown_grace_seconds,
        options=ServerOptions.from_settings(settings),
    )
