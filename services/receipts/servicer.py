"""Thin gRPC servicer of the receipts service: validate, call the domain, map back."""

from __future__ import annotations

from coinstore.receipts.v1 import receipt_service_pb2_grpc as pb_grpc


class ReceiptServiceServicer(pb_grpc.ReceiptServiceServicer):
    """RPCs not implemented yet answer UNIMPLEMENTED (the generated default)."""
