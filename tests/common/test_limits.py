"""check_request's two paths: the quick clearance and the field-by-field walk that names
the breach. Text the quick path cannot clear (not printable, yet no control character)
must still pass, and a breach anywhere must still be named."""

from __future__ import annotations

import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from coinstore.type.v1 import money_pb2
from coinstore.wallet.v1 import wallet_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.limits import MAX_REPEATED, check_request


@pytest.mark.parametrize("text", ["a\u00a0b", "zero\u200bwidth", "line\u2028sep", "\U000e0001tag"])
def test_text_that_is_not_printable_but_holds_no_control_character_passes(text: str) -> None:
    check_request(pb.CreditPurchaseRequest(request_id=text, price=money_pb2.Money(currency_code=text)))
    check_request(FieldMask(paths=["ok", text]))


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.CreditPurchaseRequest(request_id="r", storefront="US\x00A"), "storefront"),
        (pb.CreditPurchaseRequest(price=money_pb2.Money(currency_code="\x85USD")), "price.currency_code"),
        (FieldMask(paths=["ok", "also ok", "bad\x7f"]), "paths[2]"),
        (FieldMask(paths=["p"] * (MAX_REPEATED + 1)), "paths"),
        (
            pb.CreditPurchasesRequest(
                requests=[pb.CreditPurchaseRequest(request_id="r1"), pb.CreditPurchaseRequest(account_id="\t")]
            ),
            "requests[1].account_id",
        ),
    ],
)
def test_a_breach_anywhere_is_named(message: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_request(message)  # type: ignore[arg-type]
    assert caught.value.field == field
