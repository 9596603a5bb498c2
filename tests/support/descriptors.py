"""Every RPC of the three services, read from their descriptors, so tests that must
cover each RPC (the auth table, the wire fuzzer) pick up a new RPC by themselves;
and Hypothesis strategies for their requests, built from the same descriptors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from coinstore.payouts.v1 import payout_service_pb2
from coinstore.receipts.v1 import receipt_service_pb2
from coinstore.wallet.v1 import wallet_service_pb2
from services.common.auth import required_scopes

SERVICE_FILES: tuple[FileDescriptor, ...] = (
    wallet_service_pb2.DESCRIPTOR,
    receipt_service_pb2.DESCRIPTOR,
    payout_service_pb2.DESCRIPTOR,
)


@dataclass(frozen=True)
class Rpc:
    path: str  # /package.Service/Method
    method: MethodDescriptor
    scope: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)


def all_rpcs(files: tuple[FileDescriptor, ...] = SERVICE_FILES) -> Iterator[Rpc]:
    scopes = required_scopes(files)
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                yield Rpc(path, method, scopes[path])


def default_answers(files: tuple[FileDescriptor, ...] = SERVICE_FILES) -> grpc.GenericRpcHandler[Any, Any]:
    """A handler answering every RPC of ``files`` with its empty response: what the
    interceptor lets through reaches it; nothing else does."""

    def handler_for(rpc: Rpc) -> grpc.RpcMethodHandler[Any, Any]:
        response = rpc.response_class

        async def answer(_request: Any, _context: Any) -> Message:
            return response()

        return grpc.unary_unary_rpc_method_handler(
            answer,
            request_deserializer=rpc.request_class.FromString,
            response_serializer=response.SerializeToString,
        )

    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for rpc in all_rpcs(files):
        service = rpc.path.split("/")[1]
        by_service.setdefault(service, {})[rpc.name] = handler_for(rpc)

    class Handlers(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
            service, _, method = details.method.lstrip("/").partition("/")  # type: ignore[attr-defined]
            return by_service.get(service, {}).get(method)

    return Handlers()


# -- Hypothesis strategies from descriptors (the wire fuzzer) ---------------------

_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Wire types a field of each kind is *not* encoded with, for "wrong wire type" fields.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
HUGE_STRING_CHARS = 200_000


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    boundary = [v for v in (0, 1, -1, low, high, low + 1, high - 1, 2**31 - 1, -(2**31)) if low <= v <= high]
    return st.one_of(st.sampled_from(boundary), st.integers(low, high))


def _texts() -> st.SearchStrategy[str]:
    """Ordinary, hostile (NUL, control, bidi, combining) and huge strings."""
    hostile = st.characters(codec="utf-8", categories=("Cc", "Cf", "Mn", "Zs", "Lo", "So"))
    return st.one_of(
        st.text(max_size=40),
        st.text(hostile, max_size=40),
        st.sampled_from(["", " ", "\x00", "a\x00b", "../../etc/passwd", "#sys/gift_revenue", "'; DROP TABLE x;--"]),
        st.builds(
            lambda c, n: c * n, st.sampled_from(["x", "\x00", "é", "\U0001f4a9"]), st.integers(1000, HUGE_STRING_CHARS)
        ),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_BOUNDS:
        return _integers(*_INT_BOUNDS[kind])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_STRING:
        return _texts()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.builds(lambda n: b"\xff" * n, st.integers(1000, 100_000)))
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field type {kind} of {field.full_name}")


def message_strategy(descriptor: Descriptor, depth: int = 3) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to random or boundary
    values (huge strings, NUL and control characters, unknown enum numbers)."""
    cls = message_factory.GetMessageClass(descriptor)
    fields = [f for f in descriptor.fields if depth > 0 or f.type != FieldDescriptor.TYPE_MESSAGE]

    def value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            single: st.SearchStrategy[Any] = message_strategy(field.message_type, depth - 1)
        else:
            single = _scalar(field)
        if field.is_repeated:
            return st.lists(single, max_size=4)
        return single

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen = draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
        for field in chosen:
            drawn = draw(value(field))
            target = getattr(message, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            if field.is_repeated:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in drawn:
                        target.add().CopyFrom(item)
                else:
                    target.extend(drawn)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(drawn)
            else:
                setattr(message, field.name, drawn)
        return message

    return build()


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_bytes(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    if wire_type == _VARINT:
        return key + (payload or b"\x00")
    if wire_type == _LEN:
        return key + _varint(len(payload)) + payload
    return key + payload.ljust(8 if wire_type == _I64 else 4, b"\x00")[: 8 if wire_type == _I64 else 4]


def request_bytes(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Raw request bodies for an RPC taking ``descriptor``: a well-formed message, one
    with unknown fields or a known field in the wrong wire type appended, a truncated
    one, or plain random bytes."""
    numbers = [f.number for f in descriptor.fields] or [1]

    @st.composite
    def odd_field(draw: st.DrawFn) -> bytes:
        unknown = draw(st.booleans())
        number = draw(st.integers(1000, 2**29 - 1)) if unknown else draw(st.sampled_from(numbers))
        wire_type = draw(st.sampled_from([_VARINT, _I64, _LEN, _I32]))
        payload = draw(st.binary(max_size=32)) if wire_type == _LEN else draw(st.binary(min_size=1, max_size=8))
        if wire_type == _VARINT:
            payload = _varint(int.from_bytes(payload, "little"))
        return _field_bytes(number, wire_type, payload)

    well_formed = message_strategy(descriptor).map(lambda m: m.SerializeToString())
    return st.one_of(
        well_formed,
        st.tuples(well_formed, st.lists(odd_field(), min_size=1, max_size=4)).map(lambda t: t[0] + b"".join(t[1])),
        well_formed.filter(lambda b: len(b) > 1).flatmap(lambda b: st.integers(1, len(b) - 1).map(lambda n: b[:n])),
        st.binary(max_size=256),
    )
