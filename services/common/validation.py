"""Request validation helpers: each failure is an InvalidArgument naming the field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from services.common.errors import InvalidArgument

MAX_ID_LENGTH = 128
# Whole-string matches (fullmatch): "$" alone would let a trailing newline through.
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@+\-/=]+")
_CURRENCY_PATTERN = re.compile(r"[A-Z]{3}")

E = TypeVar("E")


def require_id(field: str, value: str, max_length: int = MAX_ID_LENGTH) -> str:
    """A non-empty printable identifier of bounded length."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(field, f"must be at most {max_length} characters")
    if not _ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "contains characters that are not allowed in an id")
    return value


def optional_id(field: str, value: str, max_length: int = MAX_ID_LENGTH) -> str:
    return require_id(field, value, max_length) if value else ""


def require_text(field: str, value: str, max_length: int, *, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(field, f"must be at most {max_length} characters")
    return value


def require_positive(field: str, value: int, maximum: int = 2**53) -> int:
    if value <= 0:
        raise InvalidArgument(field, "must be positive")
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum}")
    return value


def require_non_negative(field: str, value: int, maximum: int = 2**53) -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum}")
    return value


def require_currency(field: str, value: str) -> str:
    if not _CURRENCY_PATTERN.fullmatch(value or ""):
        raise InvalidArgument(field, "must be an ISO 4217 code such as USD")
    return value


def require_enum(field: str, value: int, allowed: Mapping[int, E]) -> E:
    """Map a proto enum number to a domain value; UNSPECIFIED and unknown numbers are refused."""
    try:
        return allowed[value]
    except KeyError:
        raise InvalidArgument(field, f"{value} is not an accepted value") from None


def page_size(field: str, value: int, default: int = 50, maximum: int = 500) -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    if value == 0:
        return default
    return min(value, maximum)
