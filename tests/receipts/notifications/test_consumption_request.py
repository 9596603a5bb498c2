"""CONSUMPTION_REQUEST is answered only for accounts whose consent the app backend
recorded (RecordConsumptionConsent, scope purchases:consent), with the purchase's
real consumption from the wallet (coin provenance); otherwise it is not answered,
and counted. The real wallet; the App Store's Send Consumption Information recorded."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from coinstore.receipts.v1 import receipt_service_pb2 as pb
from services.common.db import Database
from services.receipts.purchases.model import Environment
from services.receipts.wiring import build_servicer
from services.storesim.apple import AppleStore
from tests.receipts.notifications.conftest import Core
from tests.receipts.notifications.test_handle import Harness, credited
from tests.receipts.support import receipts_service
from tests.support.status import error_reason
from tests.support.tokens import Keys


def unanswered(harness: Harness, reason: str) -> float | None:
    return harness.metrics.registry.get_sample_value(
        "coinstore_consumption_requests_unanswered_total", {"reason": reason}
    )


def test_answered_with_the_real_consumption_only_with_consent(
    receipts_db: Database, apple_store: AppleStore, core: Core
) -> None:
    harness = Harness(receipts_db, apple_store, core, send_consumption=True)
    try:
        tx = credited(harness, "fan-cr", "3400000001")
        # The fan spends some of the purchase's coins on gifts.
        core.loop.run(core.wallet.gift("fan-cr", "creator-cr", "rose", 35))
        spent = 350 - core.balance("fan-cr")
        assert spent > 0
        # No consent recorded: not answered, counted.
        assert harness.process(harness.store_apple("CONSUMPTION_REQUEST", tx)) == "consumption_not_answered:no_consent"
        assert harness.apple_api.sent == []
        assert unanswered(harness, "no_consent") == 1
        servicer_consent(core, "fan-cr", True)
        assert harness.process(harness.store_apple("CONSUMPTION_REQUEST", tx)) == "consumption_sent"
        assert harness.apple_api.sent == [
            (
                "3400000001",
                Environment.PRODUCTION,
                {
                    "customerConsented": True,
                    "sampleContentProvided": False,
                    "deliveryStatus": "DELIVERED",
                    "consumptionPercentage": spent * 100_000 // 350,
                },
            )
        ]
        # Withdrawn: not answered again.
        servicer_consent(core, "fan-cr", False)
        assert harness.process(harness.store_apple("CONSUMPTION_REQUEST", tx)) == "consumption_not_answered:no_consent"
        assert len(harness.apple_api.sent) == 1
        assert unanswered(harness, "no_consent") == 2
    finally:
        harness.loop.close()


def servicer_consent(core: Core, account_id: str, consented: bool) -> None:
    """RecordConsumptionConsent as the app backend calls it (the servicer the gRPC host serves)."""
    servicer = build_servicer(core.components)
    request = pb.RecordConsumptionConsentRequest(account_id=account_id, consented=consented)
    reply = core.loop.run(servicer.RecordConsumptionConsent(request, None))
    assert (reply.account_id, reply.consented) == (account_id, consented)


async def test_consent_rpc_over_grpc_needs_its_scope(keys: Keys, database_url: str, tmp_path: Path) -> None:
    async with receipts_service(keys, database_url, tmp_path) as receipts:
        request = pb.RecordConsumptionConsentRequest(account_id="fan-g", consented=True)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await receipts.stub.RecordConsumptionConsent(request, metadata=receipts.md("purchases:verify"), timeout=30)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = await receipts.stub.RecordConsumptionConsent(
            request, metadata=receipts.md("purchases:consent"), timeout=30
        )
        assert reply.consented
        assert reply.update_time.seconds > 0
        nobody = pb.RecordConsumptionConsentRequest(consented=True)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await receipts.stub.RecordConsumptionConsent(nobody, metadata=receipts.md("purchases:consent"), timeout=30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(invalid.value) == "INVALID_ARGUMENT"
