"""Limits every request meets before a servicer sees it: no control characters in any
text field (a NUL byte used to reach PostgreSQL and come back INTERNAL), and no
repeated field longer than a generous ceiling. Servicers still check their own
tighter bounds (lengths, page sizes, batch sizes) and name the field.
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidArgument

MAX_REPEATED = 20_000
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
# C0 controls, DEL and C1 controls: never part of an id, a name or a reason.
_CONTROLS = frozenset(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))


def check_request(message: Message, prefix: str = "") -> None:
    """Raise InvalidArgument naming the first field that breaks a limit."""
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        repeated = field.is_repeated
        if repeated and len(value) > MAX_REPEATED:
            raise InvalidArgument(name, f"at most {MAX_REPEATED} items")
        if field.type == _STRING:
            for index, text in enumerate(value if repeated else (value,)):
                if not _CONTROLS.isdisjoint(text):
                    where = f"{name}[{index}]" if repeated else name
                    raise InvalidArgument(where, "must not contain control characters (NUL, newline, …)")
        elif (
            field.type == _MESSAGE and field.message_type is not None and not field.message_type.GetOptions().map_entry
        ):
            for index, item in enumerate(value if repeated else (value,)):
                check_request(item, f"{name}[{index}]." if repeated else f"{name}.")


# A JSON string (escapes included); what is left after removing them is structure and scalars.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_NESTING = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw`` (well-formed or not), without parsing it:
    checked before ``json.loads``, whose recursion a deep body would exhaust."""
    depth = deepest = 0
    for match in _JSON_NESTING.finditer(_JSON_STRING.sub(b"", raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest
