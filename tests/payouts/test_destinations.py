"""Payout destinations are verified as seen: VerifyPayoutDestination names the receiver
ops checked, a destination changed since is refused, every change is kept with who made
it, and the CLI verifies with a fresh request id and shows what it verified."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coinstore.payouts.v1 import payout_service_pb2 as pb
from services.cli.main import main as coinstore
from tests.payouts.conftest import Service
from tests.payouts.test_service import destination, details


async def set_destination(service: Service, creator: str, receiver: str, request_id: str) -> None:
    await service.stub.SetPayoutDestination(
        pb.SetPayoutDestinationRequest(
            request_id=request_id, creator_account_id=creator, destination=destination(receiver)
        ),
        metadata=service.keys.metadata("payouts:request", subject="app-backend", act=creator),
    )


def verify(creator: str, receiver: str, request_id: str) -> pb.VerifyPayoutDestinationRequest:
    return pb.VerifyPayoutDestinationRequest(
        request_id=request_id, creator_account_id=creator, provider=pb.PROVIDER_PAYPAL, receiver=receiver
    )


async def test_a_destination_changed_since_ops_looked_is_refused(service: Service) -> None:
    await set_destination(service, "c1", "old@example.com", "d1")
    seen = await service.stub.GetPayoutDestination(
        pb.GetPayoutDestinationRequest(creator_account_id="c1"), metadata=service.ops()
    )
    assert seen.destination.receiver == "old@example.com"
    assert (seen.destination.changed_by.subject, seen.destination.changed_by.acting_for) == ("app-backend", "c1")
    # The creator (or whoever holds their session) changes it before ops verify what they saw.
    await set_destination(service, "c1", "thief@example.com", "d2")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.VerifyPayoutDestination(verify("c1", "old@example.com", "v1"), metadata=service.ops())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value)[0] == "DESTINATION_CHANGED"
    now = await service.stub.GetPayoutDestination(
        pb.GetPayoutDestinationRequest(creator_account_id="c1"), metadata=service.ops()
    )
    assert (now.destination.receiver, now.destination.verified) == ("thief@example.com", False)

    verified = await service.stub.VerifyPayoutDestination(
        verify("c1", "thief@example.com", "v2"), metadata=service.ops()
    )
    assert verified.destination.verified
    assert (verified.destination.verified_by.subject, verified.destination.verified_by.request_id) == ("ops", "v2")
    history = await service.stub.GetPayoutDestination(
        pb.GetPayoutDestinationRequest(creator_account_id="c1"), metadata=service.ops()
    )
    assert [(c.kind, c.receiver, c.changed_by.subject, c.changed_by.request_id) for c in history.changes] == [
        (pb.DESTINATION_CHANGE_KIND_VERIFY, "thief@example.com", "ops", "v2"),
        (pb.DESTINATION_CHANGE_KIND_SET, "thief@example.com", "app-backend", "d2"),
        (pb.DESTINATION_CHANGE_KIND_SET, "old@example.com", "app-backend", "d1"),
    ]


async def test_verify_needs_a_receiver_and_a_destination(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.VerifyPayoutDestination(verify("nobody", "x@example.com", "v0"), metadata=service.ops())
    assert (caught.value.code(), details(caught.value)[0]) == (grpc.StatusCode.NOT_FOUND, "DESTINATION_NOT_FOUND")
    await set_destination(service, "c2", "c2@example.com", "d3")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.VerifyPayoutDestination(
            pb.VerifyPayoutDestinationRequest(request_id="v3", creator_account_id="c2"), metadata=service.ops()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[1] == "destination.provider"


async def run_cli(service: Service, *args: str) -> int:
    token = service.keys.token(["payouts:ops"], subject="operator-ann")

    def run() -> int:
        try:
            coinstore(["payouts", "--address", service.address, "--token", token, *args])
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    return await asyncio.to_thread(run)


async def test_cli_verifies_what_it_shows_never_a_replayed_answer(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    await set_destination(service, "c3", "first@example.com", "d4")
    assert await run_cli(service, "verify-destination", "c3") == 0
    out = capsys.readouterr().out
    assert "first@example.com  verified" in out
    assert "verified by operator-ann" in out

    # Changed and verified again: the CLI shows the new receiver, not its earlier answer replayed.
    await set_destination(service, "c3", "second@example.com", "d5")
    assert await run_cli(service, "verify-destination", "c3") == 0
    out = capsys.readouterr().out
    assert "second@example.com  verified" in out
    assert "first@example.com" not in out

    # Ops name what they checked; a destination changed since is refused and nothing is verified.
    await set_destination(service, "c3", "third@example.com", "d6")
    assert await run_cli(service, "verify-destination", "c3", "--receiver", "second@example.com") == 1
    assert "FAILED_PRECONDITION: the creator's payout destination is no longer" in capsys.readouterr().err
    assert await run_cli(service, "destination", "c3") == 0
    out = capsys.readouterr().out
    assert "third@example.com  NOT verified" in out
    assert "SET     third@example.com  by app-backend" in out
