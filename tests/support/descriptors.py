"""Every RPC of the three services, read from their descriptors, so tests that must
cover each RPC (the auth table, the wire fuzzer) pick up a new RPC by themselves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.message import Message

from coinstore.payouts.v1 import payout_service_pb2
from coinstore.receipts.v1 import receipt_service_pb2
from coinstore.wallet.v1 import wallet_service_pb2
from services.common.auth import required_scopes

SERVICE_FILES: tuple[FileDescriptor, ...] = (
    wallet_service_pb2.DESCRIPTOR,
    receipt_service_pb2.DESCRIPTOR,
    payout_service_pb2.DESCRIPTOR,
)


@dataclass(frozen=True)
class Rpc:
    path: str  # /package.Service/Method
    method: MethodDescriptor
    scope: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)


def all_rpcs(files: tuple[FileDescriptor, ...] = SERVICE_FILES) -> Iterator[Rpc]:
    scopes = required_scopes(files)
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                yield Rpc(path, method, scopes[path])


def default_answers(files: tuple[FileDescriptor, ...] = SERVICE_FILES) -> grpc.GenericRpcHandler[Any, Any]:
    """A handler answering every RPC of ``files`` with its empty response: what the
    interceptor lets through reaches it; nothing else does."""

    def handler_for(rpc: Rpc) -> grpc.RpcMethodHandler[Any, Any]:
        response = rpc.response_class

        async def answer(_request: Any, _context: Any) -> Message:
            return response()

        return grpc.unary_unary_rpc_method_handler(
            answer,
            request_deserializer=rpc.request_class.FromString,
            response_serializer=response.SerializeToString,
        )

    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for rpc in all_rpcs(files):
        service = rpc.path.split("/")[1]
        by_service.setdefault(service, {})[rpc.name] = handler_for(rpc)

    class Handlers(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
            service, _, method = details.method.lstrip("/").partition("/")  # type: ignore[attr-defined]
            return by_service.get(service, {}).get(method)

    return Handlers()
