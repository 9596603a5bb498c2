"""Limits every request meets before a servicer sees it: no control characters in any
text field (a NUL byte used to reach PostgreSQL and come back INTERNAL), and no
repeated field longer than a generous ceiling. Servicers still check their own
tighter bounds (lengths, page sizes, batch sizes) and name the field.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidArgument

MAX_REPEATED = 20_000
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
# C0 controls, DEL and C1 controls: never part of an id, a name or a reason.
_CONTROLS = frozenset(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))


def check_request(message: Message) -> None:
    """Raise InvalidArgument naming the first field that breaks a limit.

    Runs on every request: :func:`_within_limits` clears nearly all of them with a few C
    calls per message, and only a request it cannot clear is walked field by field."""
    if not _within_limits(message):
        _find_breach(message, "")


@dataclass(frozen=True)
class _Shape:
    """The fields of one message type that :func:`check_request` looks at, by name."""

    text: Callable[[Message], str]  # every singular string field, joined
    repeated: tuple[str, ...]
    repeated_texts: tuple[str, ...]
    nested: tuple[str, ...]  # singular messages
    repeated_nested: tuple[str, ...]  # repeated messages, map entries excepted


@functools.cache
def _shape(descriptor: Descriptor) -> _Shape:
    """Memoized per message type (descriptors live as long as the process)."""
    fields = descriptor.fields
    return _Shape(
        text=_joined(tuple(f.name for f in fields if f.type == _STRING and not f.is_repeated)),
        repeated=tuple(f.name for f in fields if f.is_repeated),
        repeated_texts=tuple(f.name for f in fields if f.type == _STRING and f.is_repeated),
        nested=tuple(f.name for f in fields if _is_message(f) and not f.is_repeated),
        repeated_nested=tuple(f.name for f in fields if _is_message(f) and f.is_repeated),
    )


def _joined(names: tuple[str, ...]) -> Callable[[Message], str]:
    if not names:
        return lambda message: ""
    if len(names) == 1:
        return operator.attrgetter(names[0])
    values = operator.attrgetter(*names)
    return lambda message: "".join(values(message))


def _is_message(field: FieldDescriptor) -> bool:
    return field.type == _MESSAGE and field.message_type is not None and not field.message_type.GetOptions().map_entry


def _within_limits(message: Message) -> bool:
    """True when ``message`` surely meets the limits. A text that ``isprintable()`` holds no
    control character (they never are); false only means "look closer"."""
    shape = _shape(message.DESCRIPTOR)
    if not shape.text(message).isprintable():
        return False
    for name in shape.repeated:
        if len(getattr(message, name)) > MAX_REPEATED:
            return False
    for name in shape.repeated_texts:
        if not "".join(getattr(message, name)).isprintable():
            return False
    for name in shape.nested:
        if message.HasField(name) and not _within_limits(getattr(message, name)):
            return False
    for name in shape.repeated_nested:
        for item in getattr(message, name):
            if not _within_limits(item):
                return False
    return True


def _find_breach(message: Message, prefix: str) -> None:
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
        elif _is_message(field):
            for index, item in enumerate(value if repeated else (value,)):
                _find_breach(item, f"{name}[{index}]." if repeated else f"{name}.")


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
