"""Who moved value: the authenticated caller of a request, whom it acted for, and its request id.

Every service stores an :class:`Actor` with each change of value it records (ledger
transactions, cash-outs, batches, destination changes) and shows it back as
``coinstore.type.v1.Actor``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa

from coinstore.type.v1 import actor_pb2
from services.common.auth import current_caller


@dataclass(frozen=True)
class Actor:
    """Empty ``subject``: the service itself (an expiry, a worker), or a record from before actors were kept."""

    subject: str = ""
    key_id: str = ""
    acting_for: str = ""
    request_id: str = ""

    @classmethod
    def of_request(cls, request_id: str) -> Actor:
        """The caller of the RPC being served (its verified token), for ``request_id``."""
        caller = current_caller()
        if caller is None:
            return cls(request_id=request_id)
        return cls(caller.subject, caller.kid, caller.acting_for, request_id)

    @classmethod
    def of_row(cls, row: Any, prefix: str = "actor_") -> Actor:
        """Read the four ``<prefix>…`` columns of a row (NULL, for rows from before, reads as empty)."""
        return cls(*(getattr(row, f"{prefix}{name}") or "" for name in FIELDS))

    def columns(self, prefix: str = "actor_") -> dict[str, str]:
        return {f"{prefix}{name}": getattr(self, name) for name in FIELDS}

    def message(self) -> actor_pb2.Actor:
        return actor_pb2.Actor(**self.columns(""))

    def describe(self) -> str:
        """One line for reports: ``sub (key kid) for act, request rid``."""
        who = self.subject or "(service)"
        if self.key_id:
            who += f" (key {self.key_id})"
        if self.acting_for:
            who += f" for {self.acting_for}"
        if self.request_id:
            who += f", request {self.request_id}"
        return who


SYSTEM = Actor()
# The field names, in order: the column suffixes and the proto's field names alike.
FIELDS = tuple(f.name for f in fields(Actor))


def actor_columns(prefix: str = "actor_", *, nullable: bool = True) -> list[sa.Column[Any]]:
    """The four columns an Actor is stored in (nullable on tables that had rows before)."""
    return [sa.Column(f"{prefix}{name}", sa.Text, nullable=nullable) for name in FIELDS]
