"""Thin gRPC servicer of the payouts service: validate, call the domain, map back."""

from __future__ import annotations

from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc


class PayoutServiceServicer(pb_grpc.PayoutServiceServicer):
    """RPCs not implemented yet answer UNIMPLEMENTED (the generated default)."""
