"""Legacy app receipts (PKCS#7 signedData, base64): the transaction ids in them.

Like Apple's ``ReceiptUtility``, nothing here is trusted: the ids are only used
to ask the App Store Server API, whose signed answers are verified. The receipt
layout (Receipt Validation Programming Guide) is a SET of (type, version, value)
attributes; type 2 is the bundle id, type 17 an in-app purchase whose own SET
holds 1703 (transaction id) and 1705 (original transaction id).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import asn1

from services.common.errors import InvalidArgument

PKCS7_SIGNED_DATA = "1.2.840.113549.1.7.2"
BUNDLE_ID = 2
IN_APP = 17
TRANSACTION_ID = 1703
ORIGINAL_TRANSACTION_ID = 1705
MAX_RECEIPT_LENGTH = 1024 * 1024


@dataclass(frozen=True)
class AppReceipt:
    bundle_id: str
    transaction_ids: tuple[str, ...]


def _decode(data: bytes) -> Any:
    decoder = asn1.Decoder()
    decoder.start(data)
    _tag, value = decoder.read()
    return value


def _attributes(value: Any) -> list[tuple[int, bytes]]:
    if not isinstance(value, list):
        raise ValueError("not a SET of attributes")
    found = []
    for item in value:
        if isinstance(item, list) and len(item) == 3 and isinstance(item[0], int) and isinstance(item[2], bytes):
            found.append((item[0], item[2]))
    return found


def parse_app_receipt(app_receipt: str, field: str = "app_receipt") -> AppReceipt:
    """The bundle id and the in-app transaction ids of a base64 app receipt.

    A malformed receipt → INVALID_ARGUMENT ``MALFORMED_RECEIPT``.
    """
    if len(app_receipt) > MAX_RECEIPT_LENGTH:
        raise InvalidArgument(field, "the receipt is too long", "MALFORMED_RECEIPT")
    try:
        outer = _decode(base64.b64decode(app_receipt, validate=True))
        if not isinstance(outer, list) or outer[0] != PKCS7_SIGNED_DATA:
            raise ValueError("not PKCS#7 signedData")
        content = outer[1][0][2][1][0]
        if not isinstance(content, bytes):
            raise ValueError("no receipt content")
        payload = _decode(content)
        if isinstance(payload, bytes):  # Xcode nests the OCTET STRING once more
            payload = _decode(payload)
        bundle_id = ""
        ids: list[str] = []
        for kind, raw in _attributes(payload):
            if kind == BUNDLE_ID:
                value = _decode(raw)
                bundle_id = value if isinstance(value, str) else ""
            elif kind == IN_APP:
                original = ""
                transaction = ""
                for inner_kind, inner_raw in _attributes(_decode(raw)):
                    if inner_kind == TRANSACTION_ID:
                        transaction = str(_decode(inner_raw))
                    elif inner_kind == ORIGINAL_TRANSACTION_ID:
                        original = str(_decode(inner_raw))
                chosen = transaction or original
                if chosen and chosen not in ids:
                    ids.append(chosen)
    except (ValueError, TypeError, IndexError, KeyError, RecursionError, binascii.Error, asn1.Error):
        raise InvalidArgument(field, "not a base64 PKCS#7 App Store receipt", "MALFORMED_RECEIPT") from None
    return AppReceipt(bundle_id, tuple(ids))
