"""Thin gRPC servicer of the wallet service: validate, call the domain, map back."""

from __future__ import annotations

from coinstore.wallet.v1 import wallet_service_pb2_grpc as pb_grpc


class WalletServiceServicer(pb_grpc.WalletServiceServicer):
    """RPCs not implemented yet answer UNIMPLEMENTED (the generated default)."""
