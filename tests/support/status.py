"""Reading the rich status (google.rpc.Status) of a coinstore gRPC error."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def _details(error: grpc.RpcError) -> list:  # type: ignore[type-arg]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status must carry google.rpc.Status details"
    return list(status.details)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    for detail in _details(error):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def error_reason(error: grpc.RpcError) -> str:
    return str(error_info(error).reason)


def bad_field(error: grpc.RpcError) -> str:
    """The field the BadRequest of an INVALID_ARGUMENT names."""
    for detail in _details(error):
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest in the status details")
