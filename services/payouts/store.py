"""SQL of the payouts service (SQLAlchemy Core). Transactions live here.

Every state change is a conditional UPDATE (``… WHERE state = :expected``): a row
count of 0 means another worker (or an earlier run of the same task) already made
the move, so every task can run twice without effect.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.common.actor import SYSTEM, Actor, actor_columns
from services.common.db import Database
from services.common.errors import RequestIdReused
from services.common.idempotency import RequestLog, fingerprint, insert_ignore, request_log_table
from services.payouts.domain.model import (
    CLAWED_BACK,
    HOLD_EXPIRED,
    Batch,
    BatchState,
    Cashout,
    CashoutState,
    Chunk,
    ChunkState,
    Destination,
    DestinationChange,
    DestinationChangeKind,
    PayoutLine,
    Settlement,
    StateTotal,
    WalletAction,
    reservation_id,
)
from services.payouts.domain.rules import daily_limit_error
from services.payouts.errors import FailedPrecondition, InvalidArgument, NotFound

T = TypeVar("T")

metadata = sa.MetaData()
request_log = request_log_table(metadata, "payouts")

destinations = sa.Table(
    "payouts_destinations",
    metadata,
    sa.Column("creator_account_id", sa.String(128), primary_key=True),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("receiver", sa.String(254), nullable=False),
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Who last set the destination, and who verified it (NULL: before payouts_0004, or unverified).
    *actor_columns("changed_by_"),
    *actor_columns("verified_by_"),
)

# Every change of a destination (SET with a new receiver, VERIFY), with who made it.
destination_changes = sa.Table(
    "payouts_destination_changes",
    metadata,
    sa.Column("change_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("creator_account_id", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("receiver", sa.String(254), nullable=False),
    *actor_columns(nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("payouts_destination_changes_creator", "creator_account_id", "change_id"),
)

batches = sa.Table(
    "payouts_batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("cutoff_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("item_count", sa.BigInteger, nullable=False),
    sa.Column("diamonds", sa.BigInteger, nullable=False),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("chunk_seq", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    # The sweeper re-queues the batch's planning when this passes.
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    *actor_columns(),  # who created the batch
    sa.Index("payouts_batches_created", "created_at"),
    sa.Index("payouts_batches_due", "state", "due_at"),
)

chunks = sa.Table(
    "payouts_chunks",
    metadata,
    # Our id of one provider submission: PayPal's sender_batch_id.
    sa.Column("chunk_id", sa.String(96), primary_key=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("provider_batch_id", sa.String(64), nullable=False),
    sa.Column("item_count", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    # Provider calls started for this submission, ambiguous answers met, and why it was parked.
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("ambiguous", sa.Integer, nullable=False, server_default="0"),
    sa.Column("park_reason", sa.String(512), nullable=False, server_default=""),
    sa.Index("payouts_chunks_batch", "batch_id"),
    sa.Index("payouts_chunks_due", "state", "due_at"),
)

cashouts = sa.Table(
    "payouts_cashouts",
    metadata,
    sa.Column("cashout_id", sa.String(64), primary_key=True),
    sa.Column("creator_account_id", sa.String(128), nullable=False),
    sa.Column("diamonds", sa.BigInteger, nullable=False),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("rate", sa.String(40), nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("receiver", sa.String(254), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=True),
    sa.Column("chunk_id", sa.String(96), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("reservation_id", sa.String(96), nullable=False),
    sa.Column("failure_reason", sa.String(256), nullable=False),
    sa.Column("provider_item_id", sa.String(64), nullable=False),
    sa.Column("provider_transaction_id", sa.String(64), nullable=False),
    sa.Column("provider_status", sa.String(32), nullable=False),
    # Outbox of the wallet call this cash-out still needs (COMMIT or RELEASE) and whether it was made.
    sa.Column("wallet_action", sa.String(8), nullable=True),
    sa.Column("wallet_done", sa.Boolean, nullable=False),
    sa.Column("request_day", sa.String(10), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    *actor_columns(),  # who asked for the cash-out
    # When the wallet hold of the current attempt lapses (asked for with the hold).
    sa.Column("hold_expire_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("payouts_cashouts_eligible", "state", "currency", "created_at"),
    sa.Index("payouts_cashouts_hold_expiry", "state", "hold_expire_at"),
    sa.Index("payouts_cashouts_creator", "creator_account_id", "created_at"),
    sa.Index("payouts_cashouts_batch", "batch_id", "state"),
    sa.Index("payouts_cashouts_chunk", "chunk_id", "state"),
    # Planning takes the next unplanned items of a batch in id order straight off this index.
    sa.Index("payouts_cashouts_plan", "batch_id", "chunk_id", "cashout_id"),
    sa.Index("payouts_cashouts_wallet", "wallet_done", "updated_at"),
)

# What each creator has requested per UTC day and currency; the daily limit is a
# conditional UPDATE on this row, so concurrent requests cannot both slip under it.
daily_totals = sa.Table(
    "payouts_daily_totals",
    metadata,
    sa.Column("creator_account_id", sa.String(128), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("currency", sa.String(3), primary_key=True),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
)

OPEN_STATES = (CashoutState.BATCHED.value, CashoutState.SUBMITTED.value)
# Nothing was sent to a provider yet: the sweeper may still expire these.
UNSENT_STATES = (CashoutState.REQUESTED.value, CashoutState.BATCHED.value)


def utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _req(value: datetime | None) -> datetime:
    result = utc(value)
    assert result is not None
    return result


def encode_token(*parts: str) -> str:
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode()


def decode_token(field: str, token: str, parts: int) -> list[str]:
    try:
        values = base64.urlsafe_b64decode(token.encode()).decode().split("\x1f")
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(field, "is not a page token this service issued") from None
    if len(values) != parts:
        raise InvalidArgument(field, "is not a page token this service issued")
    return values


def decode_time_token(field: str, token: str) -> tuple[datetime, str]:
    """A (created_at, id) page token; a decodable token with a bad time is refused too."""
    created, last_id = decode_token(field, token, 2)
    try:
        return datetime.fromisoformat(created), last_id
    except ValueError:
        raise InvalidArgument(field, "is not a page token this service issued") from None


@dataclass(frozen=True)
class RequestKey:
    """An AIP-155 request: replays return ``render``'s stored bytes, recorded in the effect's transaction."""

    method: str
    request_id: str
    request: Message
    render: Callable[[Any], Message]
    actor: Actor = SYSTEM  # the authenticated caller; the service itself when empty

    @property
    def moved_by(self) -> Actor:
        """Who moves value with this request (the service itself keeps the request id)."""
        return self.actor if self.actor.request_id else Actor(request_id=self.request_id)


class PayoutStore:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._log = RequestLog(request_log)

    # -- request ids ---------------------------------------------------------------------------------

    def replayed(self, key: RequestKey) -> bytes | None:
        """The stored response of an earlier identical request (REQUEST_ID_REUSED if the body differs)."""
        with self.db.connect() as conn:
            row = conn.execute(
                sa.select(request_log.c.request_hash, request_log.c.response).where(
                    request_log.c.method == key.method, request_log.c.request_id == key.request_id
                )
            ).first()
        if row is None:
            return None
        if row.request_hash != fingerprint(key.request) or row.response is None:
            raise RequestIdReused(key.request_id)
        return bytes(row.response)

    def in_request(self, key: RequestKey, work: Callable[[Connection], T]) -> bytes:
        """Claim the request id, do ``work`` and record its rendered response, all in one transaction."""

        def tx(conn: Connection) -> bytes:
            stored = self._log.claim(conn, key.method, key.request_id, key.request)
            if stored is not None:
                return stored
            response = key.render(work(conn))
            self._log.record(conn, key.method, key.request_id, response)
            return response.SerializeToString(deterministic=True)

        return self.db.transaction(tx)

    # -- destinations --------------------------------------------------------------------------------

    def set_destination(
        self, conn: Connection, creator: str, provider: str, receiver: str, now: datetime, actor: Actor = SYSTEM
    ) -> Destination:
        unverified = {"verified": False, **Actor().columns("verified_by_")}
        changed = conn.execute(
            insert_ignore(conn, destinations)
            .values(
                creator_account_id=creator,
                provider=provider,
                receiver=receiver,
                updated_at=now,
                **unverified,
                **actor.columns("changed_by_"),
            )
            .returning(destinations.c.creator_account_id)
        ).first()
        # A changed destination must be verified again; re-sending the same one keeps its verification.
        changed = (
            changed
            or conn.execute(
                destinations.update()
                .where(
                    destinations.c.creator_account_id == creator,
                    sa.or_(destinations.c.provider != provider, destinations.c.receiver != receiver),
                )
                .values(
                    provider=provider, receiver=receiver, updated_at=now, **unverified, **actor.columns("changed_by_")
                )
                .returning(destinations.c.creator_account_id)
            ).first()
        )
        if changed is not None:
            self._record_change(conn, creator, DestinationChangeKind.SET, provider, receiver, now, actor)
        found = self.destination(conn, creator)
        assert found is not None
        return found

    def verify_destination(
        self, conn: Connection, creator: str, provider: str, receiver: str, now: datetime, actor: Actor = SYSTEM
    ) -> Destination:
        """Verify the destination ops looked at: still ``provider``/``receiver``, or refused."""
        updated = conn.execute(
            destinations.update()
            .where(
                destinations.c.creator_account_id == creator,
                destinations.c.provider == provider,
                destinations.c.receiver == receiver,
            )
            .values(verified=True, updated_at=now, **actor.columns("verified_by_"))
        ).rowcount
        if not updated:
            if self.destination(conn, creator) is None:
                raise NotFound(
                    "DESTINATION_NOT_FOUND", "the creator has no payout destination", {"creator_account_id": creator}
                )
            raise FailedPrecondition(
                "DESTINATION_CHANGED",
                "the creator's payout destination is no longer the one named: look at it again"
                " (GetPayoutDestination) before verifying",
                {"creator_account_id": creator},
            )
        self._record_change(conn, creator, DestinationChangeKind.VERIFY, provider, receiver, now, actor)
        found = self.destination(conn, creator)
        assert found is not None
        return found

    def _record_change(
        self,
        conn: Connection,
        creator: str,
        kind: DestinationChangeKind,
        provider: str,
        receiver: str,
        now: datetime,
        actor: Actor,
    ) -> None:
        conn.execute(
            destination_changes.insert().values(
                creator_account_id=creator,
                kind=kind.value,
                provider=provider,
                receiver=receiver,
                created_at=now,
                **actor.columns(),
            )
        )

    def destination(self, conn: Connection, creator: str) -> Destination | None:
        row = conn.execute(sa.select(destinations).where(destinations.c.creator_account_id == creator)).first()
        if row is None:
            return None
        return Destination(
            row.creator_account_id,
            row.provider,
            row.receiver,
            bool(row.verified),
            Actor.of_row(row, "changed_by_"),
            Actor.of_row(row, "verified_by_"),
            utc(row.updated_at),
        )

    def destination_history(self, creator: str, limit: int) -> tuple[Destination | None, list[DestinationChange]]:
        """The destination and its latest ``limit`` changes, newest first."""
        with self.db.connect() as conn:
            current = self.destination(conn, creator)
            rows = conn.execute(
                sa.select(destination_changes)
                .where(destination_changes.c.creator_account_id == creator)
                .order_by(destination_changes.c.change_id.desc())
                .limit(limit)
            ).all()
        return current, [
            DestinationChange(
                DestinationChangeKind(r.kind), r.provider, r.receiver, Actor.of_row(r), _req(r.created_at)
            )
            for r in rows
        ]

    def get_destination(self, creator: str) -> Destination | None:
        with self.db.connect() as conn:
            return self.destination(conn, creator)

    # -- cash-outs -----------------------------------------------------------------------------------

    def add_daily(
        self, conn: Connection, creator: str, day: str, currency: str, amount: int, limit: int | None
    ) -> bool:
        """Count ``amount`` toward the creator's day; False (and nothing counted) if it would pass ``limit``."""
        conn.execute(
            insert_ignore(conn, daily_totals).values(
                creator_account_id=creator, day=day, currency=currency, amount_minor=0
            )
        )
        where = [
            daily_totals.c.creator_account_id == creator,
            daily_totals.c.day == day,
            daily_totals.c.currency == currency,
        ]
        if limit is not None:
            where.append(daily_totals.c.amount_minor + amount <= limit)
        return bool(
            conn.execute(
                daily_totals.update().where(*where).values(amount_minor=daily_totals.c.amount_minor + amount)
            ).rowcount
        )

    def _sub_daily(self, conn: Connection, creator: str, day: str, currency: str, amount: int) -> None:
        conn.execute(
            daily_totals.update()
            .where(
                daily_totals.c.creator_account_id == creator,
                daily_totals.c.day == day,
                daily_totals.c.currency == currency,
            )
            .values(amount_minor=daily_totals.c.amount_minor - amount)
        )

    def begin_cashout(self, values: dict[str, Any], limit: int | None) -> Cashout:
        """Write the cash-out RESERVING (before its hold) and count it toward the day, or
        return the row an earlier try of the same request wrote."""

        def tx(conn: Connection) -> Cashout:
            inserted = conn.execute(
                insert_ignore(conn, cashouts).values(**values).returning(cashouts.c.cashout_id)
            ).first()
            if inserted is not None:
                day, currency = values["request_day"], values["currency"]
                if not self.add_daily(conn, values["creator_account_id"], day, currency, values["amount_minor"], limit):
                    raise daily_limit_error(limit or 0, currency)
            found = self.cashout(conn, values["cashout_id"])
            assert found is not None
            return found

        return self.db.transaction(tx)

    def finish_reserving(self, conn: Connection, cashout_id: str, state: CashoutState, now: datetime) -> Cashout:
        """RESERVING → ``state`` once the hold exists (a no-op if another path finished it)."""
        conn.execute(
            cashouts.update()
            .where(cashouts.c.cashout_id == cashout_id, cashouts.c.state == CashoutState.RESERVING.value)
            .values(state=state.value, updated_at=now)
        )
        found = self.cashout(conn, cashout_id)
        assert found is not None
        return found

    def drop_reserving(self, cashout_id: str) -> None:
        """The wallet refused a new cash-out's hold: forget the row and its count toward the day."""

        def tx(conn: Connection) -> None:
            row = conn.execute(
                sa.select(cashouts).where(
                    cashouts.c.cashout_id == cashout_id,
                    cashouts.c.state == CashoutState.RESERVING.value,
                    cashouts.c.attempt == 1,
                )
            ).first()
            if row is None:
                return
            conn.execute(cashouts.delete().where(cashouts.c.cashout_id == cashout_id))
            self._sub_daily(conn, row.creator_account_id, row.request_day, row.currency, row.amount_minor)

        self.db.transaction(tx)

    def stale_reserving(self, older_than: datetime, limit: int = 1000) -> list[Cashout]:
        with self.db.connect() as conn:
            return [
                _cashout(r)
                for r in conn.execute(
                    _cashout_select()
                    .where(cashouts.c.state == CashoutState.RESERVING.value, cashouts.c.updated_at < older_than)
                    .limit(limit)
                )
            ]

    def refuse_reserving(self, cashout_id: str, attempt: int, reason: str, now: datetime) -> None:
        """The wallet refused the hold of a row left RESERVING: a new cash-out is cancelled, a
        retried attempt goes back to FAILED; neither counts toward the day any more."""

        def tx(conn: Connection) -> None:
            state = CashoutState.CANCELLED if attempt == 1 else CashoutState.FAILED
            moved = conn.execute(
                cashouts.update()
                .where(
                    cashouts.c.cashout_id == cashout_id,
                    cashouts.c.state == CashoutState.RESERVING.value,
                    cashouts.c.attempt == attempt,
                )
                .values(state=state.value, failure_reason=reason[:256], wallet_done=True, updated_at=now)
            ).rowcount
            if moved:
                self._sub_cashouts_daily(conn, cashouts.c.cashout_id == cashout_id)

        self.db.transaction(tx)

    def _sub_cashouts_daily(self, conn: Connection, *where: sa.ColumnElement[bool], keep: int = 0) -> bool:
        """Take the amounts of the cash-outs matching ``where`` off their days, one update per
        (creator, day, currency); ``keep`` stays counted (a re-quoted row's new amount). False if none matched."""
        found = False
        for row in conn.execute(
            sa.select(
                cashouts.c.creator_account_id,
                cashouts.c.request_day,
                cashouts.c.currency,
                sa.func.sum(cashouts.c.amount_minor).label("amount"),
            )
            .where(*where)
            .group_by(cashouts.c.creator_account_id, cashouts.c.request_day, cashouts.c.currency)
        ):
            found = True
            self._sub_daily(conn, row.creator_account_id, row.request_day, row.currency, int(row.amount) - keep)
        return found

    def expire_unsent(self, horizon: datetime, now: datetime, limit: int = 5000) -> list[str]:
        """Cash-outs not yet in a submission whose hold lapses before ``horizon`` → EXPIRED
        (HOLD_EXPIRED; the release goes to the wallet outbox). Returns their ids."""

        def tx(conn: Connection) -> list[str]:
            ids = list(
                conn.execute(
                    sa.select(cashouts.c.cashout_id)
                    .where(
                        cashouts.c.state.in_(UNSENT_STATES),
                        cashouts.c.chunk_id.is_(None),
                        cashouts.c.hold_expire_at < horizon,
                    )
                    .limit(limit)
                ).scalars()
            )
            unsent = (cashouts.c.state.in_(UNSENT_STATES), cashouts.c.chunk_id.is_(None))
            return self._end_unpaid(conn, ids, unsent, CashoutState.EXPIRED, HOLD_EXPIRED, now)

        return self.db.transaction(tx)

    def _end_unpaid(
        self,
        conn: Connection,
        cashout_ids: Sequence[str],
        where: Sequence[Any],
        state: CashoutState,
        reason: str,
        now: datetime,
    ) -> list[str]:
        """Cash-outs never sent end in ``state``: out of their submission, their holds to release
        (wallet outbox), no longer counted toward their days. Returns those that still matched ``where``."""
        moved: list[str] = []
        for part in _parts(cashout_ids, 5000):
            ended = list(
                conn.execute(
                    cashouts.update()
                    .where(cashouts.c.cashout_id.in_(part), *where)
                    .values(
                        state=state.value,
                        chunk_id=None,
                        failure_reason=reason,
                        wallet_action=WalletAction.RELEASE.value,
                        wallet_done=False,
                        updated_at=now,
                    )
                    .returning(cashouts.c.cashout_id)
                ).scalars()
            )
            if ended:
                self._sub_cashouts_daily(conn, cashouts.c.cashout_id.in_(ended))
            moved += ended
        return moved

    def prune_chunk(
        self,
        chunk_id: str,
        expired: Sequence[str],
        requoted: Sequence[tuple[str, int, int]],
        cancelled: Sequence[str],
        now: datetime,
    ) -> None:
        """Before a submission's first provider call: take out the items whose holds the wallet
        would not submit. Expired holds → EXPIRED; shrunk ones re-quoted (cash-out id, amount,
        diamonds) back to REQUESTED for a later batch, or CANCELLED with CLAWED_BACK."""

        def tx(conn: Connection) -> None:
            unsent = (cashouts.c.chunk_id == chunk_id, cashouts.c.state == CashoutState.BATCHED.value)
            for ids, state, reason in (
                (expired, CashoutState.EXPIRED, HOLD_EXPIRED),
                (cancelled, CashoutState.CANCELLED, CLAWED_BACK),
            ):
                self._end_unpaid(conn, ids, unsent, state, reason, now)
            for cashout_id, amount, diamonds in requoted:
                # Only the part of the amount the re-quote gave up stops counting toward the day.
                if not self._sub_cashouts_daily(conn, cashouts.c.cashout_id == cashout_id, *unsent, keep=amount):
                    continue
                conn.execute(
                    cashouts.update()
                    .where(cashouts.c.cashout_id == cashout_id, *unsent)
                    .values(
                        state=CashoutState.REQUESTED.value,
                        batch_id=None,
                        chunk_id=None,
                        amount_minor=amount,
                        diamonds=diamonds,
                        updated_at=now,
                    )
                )
            gone = len(expired) + len(requoted) + len(cancelled)
            if gone:
                conn.execute(
                    chunks.update()
                    .where(chunks.c.chunk_id == chunk_id)
                    .values(
                        item_count=sa.select(sa.func.count()).where(cashouts.c.chunk_id == chunk_id).scalar_subquery()
                    )
                )

        self.db.transaction(tx)

    def claim_attempt(self, chunk_id: str, now: datetime, due_at: datetime) -> int | None:
        """Count a provider call about to start for a PENDING submission (its items SUBMITTED);
        the call's number, or None."""

        def tx(conn: Connection) -> int | None:
            moved = conn.execute(
                chunks.update()
                .where(chunks.c.chunk_id == chunk_id, chunks.c.state == ChunkState.PENDING.value)
                .values(attempts=chunks.c.attempts + 1, due_at=due_at)
            ).rowcount
            if not moved:
                return None
            # From here on the provider may be paying them.
            conn.execute(
                cashouts.update()
                .where(cashouts.c.chunk_id == chunk_id, cashouts.c.state == CashoutState.BATCHED.value)
                .values(state=CashoutState.SUBMITTED.value, updated_at=now)
            )
            return int(conn.execute(sa.select(chunks.c.attempts).where(chunks.c.chunk_id == chunk_id)).scalar_one())

        return self.db.transaction(tx)

    def fail_first_attempt(self, chunk_id: str, reason: str, status: str, now: datetime) -> bool:
        """The provider refused a submission's first and only call: it created nothing, so its
        items fail (their diamonds go back). False, and nothing changes, if another call started."""

        def tx(conn: Connection) -> bool:
            moved = conn.execute(
                chunks.update()
                .where(
                    chunks.c.chunk_id == chunk_id,
                    chunks.c.state == ChunkState.PENDING.value,
                    chunks.c.attempts == 1,
                )
                .values(state=ChunkState.SUBMITTED.value, provider_batch_id="", submitted_at=now)
            ).rowcount
            if not moved:
                return False
            conn.execute(
                cashouts.update()
                .where(cashouts.c.chunk_id == chunk_id, cashouts.c.state == CashoutState.SUBMITTED.value)
                .values(
                    state=CashoutState.FAILED.value,
                    wallet_action=WalletAction.RELEASE.value,
                    wallet_done=False,
                    provider_status=status[:32],
                    failure_reason=reason[:256],
                    updated_at=now,
                )
            )
            self._sub_cashouts_daily(conn, cashouts.c.chunk_id == chunk_id)
            return True

        return self.db.transaction(tx)

    def note_ambiguous(self, chunk_id: str, reason: str, park_after: int, now: datetime) -> bool:
        """Count an answer that proves nothing about a submission; park it (True) after ``park_after``."""

        def tx(conn: Connection) -> bool:
            conn.execute(
                chunks.update()
                .where(chunks.c.chunk_id == chunk_id, chunks.c.state == ChunkState.PENDING.value)
                .values(ambiguous=chunks.c.ambiguous + 1)
            )
            return _park(conn, chunk_id, reason, now, chunks.c.ambiguous >= park_after)

        return self.db.transaction(tx)

    def park(self, chunk_id: str, reason: str, now: datetime) -> bool:
        """Park a pending submission for ops review at once (True unless it had moved on)."""
        return self.db.transaction(lambda conn: _park(conn, chunk_id, reason, now))

    def parked(self) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(chunks).where(chunks.c.state == ChunkState.PARKED.value)
                ).scalar_one()
            )

    def cashout(self, conn: Connection, cashout_id: str) -> Cashout | None:
        row = conn.execute(_cashout_select().where(cashouts.c.cashout_id == cashout_id)).first()
        return _cashout(row) if row is not None else None

    def get_cashout(self, cashout_id: str) -> Cashout | None:
        with self.db.connect() as conn:
            return self.cashout(conn, cashout_id)

    def list_cashouts(self, creator: str, size: int, token: str) -> tuple[list[Cashout], str]:
        query = _cashout_select().where(cashouts.c.creator_account_id == creator)
        if token:
            moment, last_id = decode_time_token("page_token", token)
            query = query.where(
                sa.or_(
                    cashouts.c.created_at < moment,
                    sa.and_(cashouts.c.created_at == moment, cashouts.c.cashout_id < last_id),
                )
            )
        query = query.order_by(cashouts.c.created_at.desc(), cashouts.c.cashout_id.desc()).limit(size + 1)
        with self.db.connect() as conn:
            rows = [_cashout(r) for r in conn.execute(query)]
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, encode_token(rows[-1].created_at.isoformat(), rows[-1].cashout_id)

    def list_batch_items(self, batch_id: str, size: int, token: str) -> tuple[list[Cashout], str]:
        query = _cashout_select().where(cashouts.c.batch_id == batch_id)
        if token:
            (last_id,) = decode_token("page_token", token, 1)
            query = query.where(cashouts.c.cashout_id > last_id)
        query = query.order_by(cashouts.c.cashout_id).limit(size + 1)
        with self.db.connect() as conn:
            rows = [_cashout(r) for r in conn.execute(query)]
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, encode_token(rows[-1].cashout_id)

    def cancel_cashout(self, conn: Connection, cashout_id: str, now: datetime) -> Cashout:
        found = self.cashout(conn, cashout_id)
        if found is None:
            raise NotFound("CASHOUT_NOT_FOUND", "no such cash-out", {"cashout_id": cashout_id})
        moved = conn.execute(
            cashouts.update()
            .where(cashouts.c.cashout_id == cashout_id, cashouts.c.state == CashoutState.REQUESTED.value)
            .values(
                state=CashoutState.CANCELLED.value,
                wallet_action=WalletAction.RELEASE.value,
                wallet_done=False,
                failure_reason="CANCELLED_BY_CREATOR",
                updated_at=now,
            )
        ).rowcount
        if not moved:
            raise FailedPrecondition(
                "CASHOUT_NOT_CANCELLABLE",
                f"a cash-out in state {found.state.value} cannot be cancelled (only before it is in a batch)",
                {"state": found.state.value},
            )
        self._sub_cashouts_daily(conn, cashouts.c.cashout_id == cashout_id)
        result = self.cashout(conn, cashout_id)
        assert result is not None
        return result

    # -- batches -------------------------------------------------------------------------------------

    def _eligible(self, currency: str, cutoff: datetime, max_items: int) -> sa.Select[Any]:
        query = (
            sa.select(cashouts.c.cashout_id)
            .where(
                cashouts.c.state == CashoutState.REQUESTED.value,
                cashouts.c.currency == currency,
                cashouts.c.created_at < cutoff,
            )
            .order_by(cashouts.c.created_at, cashouts.c.cashout_id)
        )
        if max_items:
            query = query.limit(max_items)
        return query

    def preview_batch(self, currency: str, cutoff: datetime, max_items: int) -> tuple[int, int, int]:
        ids = self._eligible(currency, cutoff, max_items).subquery()
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(cashouts.c.diamonds), 0),
            sa.func.coalesce(sa.func.sum(cashouts.c.amount_minor), 0),
        ).where(cashouts.c.cashout_id.in_(sa.select(ids.c.cashout_id)))
        with self.db.connect() as conn:
            count, diamonds, amount = conn.execute(query).one()
        return int(count), int(diamonds), int(amount)

    def create_batch(
        self,
        conn: Connection,
        batch_id: str,
        currency: str,
        cutoff: datetime,
        max_items: int,
        now: datetime,
        actor: Actor = SYSTEM,
    ) -> Batch:
        """Claim every eligible REQUESTED cash-out for a new batch, in this one transaction."""
        conn.execute(
            batches.insert().values(
                batch_id=batch_id,
                state=BatchState.CREATED.value,
                currency=currency,
                cutoff_time=cutoff,
                item_count=0,
                diamonds=0,
                amount_minor=0,
                chunk_seq=0,
                created_at=now,
                due_at=now,
                **actor.columns(),
            )
        )
        ids = self._eligible(currency, cutoff, max_items).subquery()
        conn.execute(
            cashouts.update()
            .where(
                cashouts.c.cashout_id.in_(sa.select(ids.c.cashout_id)),
                cashouts.c.state == CashoutState.REQUESTED.value,
            )
            .values(state=CashoutState.BATCHED.value, batch_id=batch_id, updated_at=now)
        )
        count, diamonds, amount = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(cashouts.c.diamonds), 0),
                sa.func.coalesce(sa.func.sum(cashouts.c.amount_minor), 0),
            ).where(cashouts.c.batch_id == batch_id)
        ).one()
        if not count:
            raise FailedPrecondition("NO_ELIGIBLE_CASHOUTS", "no requested cash-outs match the batch's criteria")
        conn.execute(
            batches.update()
            .where(batches.c.batch_id == batch_id)
            .values(item_count=count, diamonds=diamonds, amount_minor=amount)
        )
        return self.batch(conn, batch_id)

    def batch(self, conn: Connection, batch_id: str) -> Batch:
        row = conn.execute(sa.select(batches).where(batches.c.batch_id == batch_id)).first()
        if row is None:
            raise NotFound("BATCH_NOT_FOUND", "no such payout batch", {"batch_id": batch_id})
        totals = tuple(
            StateTotal(CashoutState(r.state), int(r.n), int(r.diamonds), int(r.amount))
            for r in conn.execute(
                sa.select(
                    cashouts.c.state,
                    sa.func.count().label("n"),
                    sa.func.sum(cashouts.c.diamonds).label("diamonds"),
                    sa.func.sum(cashouts.c.amount_minor).label("amount"),
                )
                .where(cashouts.c.batch_id == batch_id)
                .group_by(cashouts.c.state)
                .order_by(cashouts.c.state)
            )
        )
        provider_batch_id = conn.execute(
            sa.select(chunks.c.provider_batch_id)
            .where(chunks.c.batch_id == batch_id, chunks.c.provider_batch_id != "")
            .order_by(chunks.c.created_at, chunks.c.chunk_id)
            .limit(1)
        ).scalar()
        return _batch(row, totals, provider_batch_id or "")

    def get_batch(self, batch_id: str) -> Batch:
        with self.db.connect() as conn:
            return self.batch(conn, batch_id)

    def list_batches(self, size: int, token: str) -> tuple[list[Batch], str]:
        query = sa.select(batches.c.batch_id, batches.c.created_at)
        if token:
            moment, last_id = decode_time_token("page_token", token)
            query = query.where(
                sa.or_(
                    batches.c.created_at < moment,
                    sa.and_(batches.c.created_at == moment, batches.c.batch_id < last_id),
                )
            )
        query = query.order_by(batches.c.created_at.desc(), batches.c.batch_id.desc()).limit(size + 1)
        with self.db.connect() as conn:
            keys = list(conn.execute(query))
            page = [self.batch(conn, k.batch_id) for k in keys[:size]]
        if len(keys) <= size:
            return page, ""
        last = keys[size - 1]
        return page, encode_token(_req(last.created_at).isoformat(), last.batch_id)

    def cancel_batch(self, conn: Connection, batch_id: str, now: datetime) -> Batch:
        current = self.batch(conn, batch_id)
        moved = conn.execute(
            batches.update()
            .where(batches.c.batch_id == batch_id, batches.c.state == BatchState.CREATED.value)
            .values(state=BatchState.CANCELLED.value, completed_at=now)
        ).rowcount
        if not moved:
            raise FailedPrecondition(
                "BATCH_ALREADY_SUBMITTED",
                f"a batch in state {current.state.value} cannot be cancelled (only before submission)",
                {"state": current.state.value},
            )
        conn.execute(
            cashouts.update()
            .where(cashouts.c.batch_id == batch_id, cashouts.c.state == CashoutState.BATCHED.value)
            .values(state=CashoutState.REQUESTED.value, batch_id=None, updated_at=now)
        )
        return self.batch(conn, batch_id)

    def retry_candidates(self, batch_id: str) -> list[Cashout]:
        """FAILED items whose diamonds the wallet has already released."""
        with self.db.connect() as conn:
            self.batch(conn, batch_id)
            return [
                _cashout(r)
                for r in conn.execute(
                    _cashout_select()
                    .where(
                        cashouts.c.batch_id == batch_id,
                        cashouts.c.state == CashoutState.FAILED.value,
                        cashouts.c.wallet_done.is_(True),
                    )
                    .order_by(cashouts.c.cashout_id)
                )
            ]

    def begin_retry(self, batch_id: str, items: Sequence[Cashout], hold_expire_at: datetime, now: datetime) -> None:
        """FAILED items (diamonds released) → RESERVING as their next attempt, before the new holds exist."""

        def tx(conn: Connection) -> None:
            for item in items:
                attempt = item.attempt + 1
                if conn.execute(
                    cashouts.update()
                    .where(
                        cashouts.c.cashout_id == item.cashout_id,
                        cashouts.c.batch_id == batch_id,
                        cashouts.c.state == CashoutState.FAILED.value,
                        cashouts.c.attempt == item.attempt,
                        cashouts.c.wallet_done.is_(True),
                    )
                    .values(
                        state=CashoutState.RESERVING.value,
                        attempt=attempt,
                        reservation_id=reservation_id(item.cashout_id, attempt),
                        hold_expire_at=hold_expire_at,
                        chunk_id=None,
                        failure_reason="",
                        provider_item_id="",
                        provider_transaction_id="",
                        provider_status="",
                        wallet_action=None,
                        updated_at=now,
                    )
                ).rowcount:
                    self.add_daily(
                        conn,
                        item.creator_account_id,
                        _day(conn, item.cashout_id),
                        item.currency,
                        item.amount_minor,
                        None,
                    )

        self.db.transaction(tx)

    def reserving_of(self, batch_id: str) -> list[Cashout]:
        with self.db.connect() as conn:
            return [
                _cashout(r)
                for r in conn.execute(
                    _cashout_select()
                    .where(cashouts.c.batch_id == batch_id, cashouts.c.state == CashoutState.RESERVING.value)
                    .order_by(cashouts.c.cashout_id)
                )
            ]

    def finish_reserved(self, row: Cashout, now: datetime) -> None:
        """A row left RESERVING whose hold now exists: a new cash-out is REQUESTED, a retry BATCHED."""
        if row.attempt == 1:
            self.db.transaction(lambda conn: self.finish_reserving(conn, row.cashout_id, CashoutState.REQUESTED, now))
        else:
            self.db.transaction(lambda conn: self.finish_retry(conn, row.batch_id, [row.cashout_id], now))

    def finish_retry(self, conn: Connection, batch_id: str, cashout_ids: Sequence[str], now: datetime) -> int:
        """Retried attempts whose holds exist: RESERVING → BATCHED, and the batch runs again."""
        moved = 0
        for part in _parts(list(cashout_ids), 5000):
            moved += conn.execute(
                cashouts.update()
                .where(cashouts.c.cashout_id.in_(part), cashouts.c.state == CashoutState.RESERVING.value)
                .values(state=CashoutState.BATCHED.value, updated_at=now)
            ).rowcount
        if moved:
            conn.execute(
                batches.update()
                .where(
                    batches.c.batch_id == batch_id,
                    batches.c.state.in_([BatchState.SUBMITTED.value, BatchState.COMPLETED.value]),
                )
                .values(state=BatchState.SUBMITTED.value, completed_at=None, due_at=now)
            )
        return moved

    # -- pipeline ------------------------------------------------------------------------------------

    def start_batch(self, batch_id: str, now: datetime, due_at: datetime) -> BatchState:
        """CREATED → SUBMITTED (no cancelling from here on); returns the batch's state."""

        def tx(conn: Connection) -> BatchState:
            conn.execute(
                batches.update()
                .where(batches.c.batch_id == batch_id, batches.c.state == BatchState.CREATED.value)
                .values(state=BatchState.SUBMITTED.value, submitted_at=now)
            )
            conn.execute(
                batches.update()
                .where(batches.c.batch_id == batch_id, batches.c.state == BatchState.SUBMITTED.value)
                .values(due_at=due_at)
            )
            state = conn.execute(sa.select(batches.c.state).where(batches.c.batch_id == batch_id)).scalar()
            if state is None:
                raise NotFound("BATCH_NOT_FOUND", "no such payout batch", {"batch_id": batch_id})
            return BatchState(state)

        return self.db.transaction(tx)

    def unplanned(self, batch_id: str) -> list[str]:
        """The batch's items not yet in a submission, in id order (read once per planning run)."""
        with self.db.connect() as conn:
            return list(
                conn.execute(
                    sa.select(cashouts.c.cashout_id)
                    .where(
                        cashouts.c.batch_id == batch_id,
                        cashouts.c.chunk_id.is_(None),
                        cashouts.c.state == CashoutState.BATCHED.value,
                    )
                    .order_by(cashouts.c.batch_id, cashouts.c.chunk_id, cashouts.c.cashout_id)
                ).scalars()
            )

    def plan_chunk(self, batch_id: str, ids: Sequence[str], now: datetime, due_at: datetime) -> str | None:
        """Group those of ``ids`` still unplanned into a new submission; None if none were."""

        def tx(conn: Connection) -> str | None:
            # Locks the batch row: planners of one batch take turns.
            conn.execute(
                batches.update().where(batches.c.batch_id == batch_id).values(chunk_seq=batches.c.chunk_seq + 1)
            )
            seq = conn.execute(sa.select(batches.c.chunk_seq).where(batches.c.batch_id == batch_id)).scalar_one()
            chunk_id = f"{batch_id}-{seq}"
            # Rows locked by primary key, then filtered here: a plan that found them through another
            # index on stale statistics scanned the whole batch for every submission.
            free: list[str] = []
            for part in _parts(list(ids), 5000):
                locked = sa.select(
                    cashouts.c.cashout_id, cashouts.c.batch_id, cashouts.c.chunk_id, cashouts.c.state
                ).where(cashouts.c.cashout_id.in_(part))
                free += [
                    r.cashout_id
                    for r in conn.execute(locked.with_for_update() if conn.dialect.name == "postgresql" else locked)
                    if r.batch_id == batch_id and r.chunk_id is None and r.state == CashoutState.BATCHED.value
                ]
            if not free:
                return None
            for part in _parts(free, 5000):
                conn.execute(
                    cashouts.update().where(cashouts.c.cashout_id.in_(part)).values(chunk_id=chunk_id, updated_at=now)
                )
            planned = len(free)
            conn.execute(
                chunks.insert().values(
                    chunk_id=chunk_id,
                    batch_id=batch_id,
                    state=ChunkState.PENDING.value,
                    provider_batch_id="",
                    item_count=planned,
                    created_at=now,
                    due_at=due_at,
                )
            )
            return chunk_id

        return self.db.transaction(tx)

    def chunk_ids(self, batch_id: str, state: ChunkState) -> list[str]:
        with self.db.connect() as conn:
            return list(
                conn.execute(
                    sa.select(chunks.c.chunk_id)
                    .where(chunks.c.batch_id == batch_id, chunks.c.state == state.value)
                    .order_by(chunks.c.chunk_id)
                ).scalars()
            )

    def chunk(self, chunk_id: str) -> Chunk | None:
        with self.db.connect() as conn:
            row = conn.execute(sa.select(chunks).where(chunks.c.chunk_id == chunk_id)).first()
            if row is None:
                return None
            lines = tuple(
                PayoutLine(
                    r.cashout_id,
                    r.attempt,
                    r.receiver,
                    r.amount_minor,
                    r.currency,
                    r.reservation_id,
                    int(r.diamonds),
                    r.rate,
                )
                for r in conn.execute(
                    sa.select(
                        cashouts.c.cashout_id,
                        cashouts.c.attempt,
                        cashouts.c.receiver,
                        cashouts.c.amount_minor,
                        cashouts.c.currency,
                        cashouts.c.reservation_id,
                        cashouts.c.diamonds,
                        cashouts.c.rate,
                    )
                    .where(cashouts.c.chunk_id == chunk_id)
                    .order_by(cashouts.c.cashout_id)
                )
            )
        return Chunk(row.chunk_id, row.batch_id, ChunkState(row.state), row.provider_batch_id, lines)

    def touch_chunk(self, chunk_id: str, due_at: datetime) -> None:
        self.db.transaction(
            lambda conn: conn.execute(chunks.update().where(chunks.c.chunk_id == chunk_id).values(due_at=due_at))
        )

    def mark_submitted(self, chunk_id: str, provider_batch_id: str, now: datetime, due_at: datetime) -> None:
        def tx(conn: Connection) -> None:
            conn.execute(
                chunks.update()
                .where(chunks.c.chunk_id == chunk_id, chunks.c.state == ChunkState.PENDING.value)
                .values(
                    state=ChunkState.SUBMITTED.value,
                    provider_batch_id=provider_batch_id,
                    submitted_at=now,
                    due_at=due_at,
                )
            )
            conn.execute(
                cashouts.update()
                .where(cashouts.c.chunk_id == chunk_id, cashouts.c.state == CashoutState.BATCHED.value)
                .values(state=CashoutState.SUBMITTED.value, updated_at=now)
            )

        self.db.transaction(tx)

    def record_results(
        self,
        chunk_id: str,
        paid: Sequence[dict[str, Any]],
        failed: Sequence[dict[str, Any]],
        pending: Sequence[dict[str, Any]],
        now: datetime,
    ) -> None:
        """Provider results → SUBMITTED → PAID | FAILED, each opening its wallet settlement (outbox)."""

        def guarded(state_value: str) -> sa.Update:
            return cashouts.update().where(
                cashouts.c.cashout_id == sa.bindparam("b_id"),
                cashouts.c.attempt == sa.bindparam("b_attempt"),
                cashouts.c.chunk_id == chunk_id,
                cashouts.c.state == state_value,
            )

        def tx(conn: Connection) -> None:
            paid_values = {
                "state": CashoutState.PAID.value,
                "wallet_action": WalletAction.COMMIT.value,
                "wallet_done": False,
                "updated_at": now,
            }
            if paid and conn.dialect.name == "postgresql":
                # One statement for the whole chunk: the results travel as one JSON parameter.
                conn.execute(
                    _PAID_FROM_JSON,
                    {
                        "rows": json.dumps(list(paid)),
                        "chunk_id": chunk_id,
                        "submitted": CashoutState.SUBMITTED.value,
                        **paid_values,
                    },
                )
            elif paid:
                conn.execute(
                    guarded(CashoutState.SUBMITTED.value).values(
                        provider_item_id=sa.bindparam("b_item"),
                        provider_transaction_id=sa.bindparam("b_txn"),
                        provider_status=sa.bindparam("b_status"),
                        **paid_values,
                    ),
                    list(paid),
                )
            for params in failed:
                moved = conn.execute(
                    guarded(CashoutState.SUBMITTED.value).values(
                        state=CashoutState.FAILED.value,
                        wallet_action=WalletAction.RELEASE.value,
                        wallet_done=False,
                        provider_item_id=sa.bindparam("b_item"),
                        provider_transaction_id=sa.bindparam("b_txn"),
                        provider_status=sa.bindparam("b_status"),
                        failure_reason=sa.bindparam("b_reason"),
                        updated_at=now,
                    ),
                    params,
                ).rowcount
                if moved:
                    self._sub_cashouts_daily(conn, cashouts.c.cashout_id == params["b_id"])
            if pending:
                # Polled every few seconds for up to 15,000 items: write only the rows that changed.
                conn.execute(
                    guarded(CashoutState.SUBMITTED.value)
                    .where(
                        sa.or_(
                            cashouts.c.provider_item_id != sa.bindparam("b_item"),
                            cashouts.c.provider_status != sa.bindparam("b_status"),
                        )
                    )
                    .values(provider_item_id=sa.bindparam("b_item"), provider_status=sa.bindparam("b_status")),
                    list(pending),
                )

        self.db.transaction(tx)

    def settlements(
        self,
        *,
        chunk_id: str | None = None,
        cashout_ids: Sequence[str] | None = None,
        older_than: datetime | None = None,
        limit: int = 5000,
    ) -> list[Settlement]:
        """The wallet outbox (holds still to commit or release), filtered by whichever arguments are given."""
        query = sa.select(
            cashouts.c.cashout_id,
            cashouts.c.reservation_id,
            cashouts.c.wallet_action,
            cashouts.c.failure_reason,
            cashouts.c.diamonds,
        ).where(cashouts.c.wallet_done.is_(False))
        if cashout_ids is not None:
            query = query.where(cashouts.c.cashout_id.in_(cashout_ids))
        if chunk_id is not None:
            query = query.where(cashouts.c.chunk_id == chunk_id)
        if older_than is not None:
            query = query.where(cashouts.c.updated_at < older_than)
        with self.db.connect() as conn:
            return [
                Settlement(
                    r.cashout_id, r.reservation_id, WalletAction(r.wallet_action), r.failure_reason, int(r.diamonds)
                )
                for r in conn.execute(query.limit(limit))
            ]

    def mark_settled(self, done: Iterable[tuple[str, str]], now: datetime) -> None:
        """Close the wallet outbox of (cash-out id, reservation id) pairs."""
        pairs = list(done)
        if not pairs:
            return

        def tx(conn: Connection) -> None:
            # A reservation id names its cash-out and attempt, so the two IN lists select exactly the pairs.
            for part in _parts(pairs, 5000):
                conn.execute(
                    cashouts.update()
                    .where(
                        cashouts.c.cashout_id.in_([c for c, _ in part]),
                        cashouts.c.reservation_id.in_([r for _, r in part]),
                        cashouts.c.wallet_done.is_(False),
                    )
                    .values(wallet_done=True, updated_at=now)
                )

        self.db.transaction(tx)

    def finish_chunk(self, chunk_id: str, batch_id: str, now: datetime) -> tuple[bool, bool]:
        """Close the chunk once every item is settled, and the batch once all are; returns (chunk, batch) done."""

        def tx(conn: Connection) -> tuple[bool, bool]:
            open_items = conn.execute(
                sa.select(sa.func.count())
                .select_from(cashouts)
                .where(
                    cashouts.c.chunk_id == chunk_id,
                    sa.or_(cashouts.c.state.in_(OPEN_STATES), cashouts.c.wallet_done.is_(False)),
                )
            ).scalar_one()
            if open_items:
                return False, False
            conn.execute(
                chunks.update()
                .where(chunks.c.chunk_id == chunk_id, chunks.c.state == ChunkState.SUBMITTED.value)
                .values(state=ChunkState.DONE.value)
            )
            return True, self._finish_batch(conn, batch_id, now)

        return self.db.transaction(tx)

    def finish_batch(self, batch_id: str, now: datetime) -> bool:
        return self.db.transaction(lambda conn: self._finish_batch(conn, batch_id, now))

    def _finish_batch(self, conn: Connection, batch_id: str, now: datetime) -> bool:
        # Two index probes (batch_id+state, then the few unsettled rows) instead of a scan of the batch.
        unfinished = conn.execute(
            sa.select(cashouts.c.cashout_id)
            .where(cashouts.c.batch_id == batch_id, cashouts.c.state.in_(OPEN_STATES))
            .limit(1)
        ).first()
        if unfinished is None:
            unfinished = conn.execute(
                sa.select(cashouts.c.cashout_id)
                .where(cashouts.c.wallet_done.is_(False), cashouts.c.batch_id == batch_id)
                .limit(1)
            ).first()
        if unfinished is not None:
            return False
        conn.execute(
            batches.update()
            .where(batches.c.batch_id == batch_id, batches.c.state == BatchState.SUBMITTED.value)
            .values(state=BatchState.COMPLETED.value, completed_at=now)
        )
        return True

    def due_work(self, now: datetime, next_due: datetime) -> tuple[list[str], list[tuple[str, str]]]:
        """Batches and chunks nobody has touched in time (their messages were lost); claims them until ``next_due``."""

        def tx(conn: Connection) -> tuple[list[str], list[tuple[str, str]]]:
            open_batches = list(
                conn.execute(
                    sa.select(batches.c.batch_id).where(
                        batches.c.state.in_([BatchState.CREATED.value, BatchState.SUBMITTED.value]),
                        batches.c.due_at < now,
                    )
                ).scalars()
            )
            if open_batches:
                conn.execute(batches.update().where(batches.c.batch_id.in_(open_batches)).values(due_at=next_due))
            open_chunks = [
                (r.chunk_id, r.state)
                for r in conn.execute(
                    sa.select(chunks.c.chunk_id, chunks.c.state).where(
                        chunks.c.state.in_([ChunkState.PENDING.value, ChunkState.SUBMITTED.value]),
                        chunks.c.due_at < now,
                    )
                )
            ]
            if open_chunks:
                conn.execute(
                    chunks.update().where(chunks.c.chunk_id.in_([c for c, _ in open_chunks])).values(due_at=next_due)
                )
            return open_batches, open_chunks

        return self.db.transaction(tx)


def _day(conn: Connection, cashout_id: str) -> str:
    return str(conn.execute(sa.select(cashouts.c.request_day).where(cashouts.c.cashout_id == cashout_id)).scalar_one())


_PAID_FROM_JSON = sa.text(
    """
    UPDATE payouts_cashouts AS c
    SET state = :state, wallet_action = :wallet_action, wallet_done = :wallet_done, updated_at = :updated_at,
        provider_item_id = r.b_item, provider_transaction_id = r.b_txn, provider_status = r.b_status
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS r(b_id varchar, b_attempt integer, b_item varchar, b_txn varchar, b_status varchar)
    WHERE c.cashout_id = r.b_id AND c.attempt = r.b_attempt AND c.chunk_id = :chunk_id AND c.state = :submitted
    """
)


def _parts(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cashout_select() -> sa.Select[Any]:
    return sa.select(cashouts, chunks.c.provider_batch_id).select_from(
        cashouts.outerjoin(chunks, chunks.c.chunk_id == cashouts.c.chunk_id)
    )


def _cashout(row: Any) -> Cashout:
    return Cashout(
        cashout_id=row.cashout_id,
        creator_account_id=row.creator_account_id,
        diamonds=int(row.diamonds),
        amount_minor=int(row.amount_minor),
        currency=row.currency,
        rate=row.rate,
        provider=row.provider,
        receiver=row.receiver,
        state=CashoutState(row.state),
        batch_id=row.batch_id or "",
        chunk_id=row.chunk_id or "",
        attempt=int(row.attempt),
        reservation_id=row.reservation_id,
        failure_reason=row.failure_reason,
        provider_item_id=row.provider_item_id,
        provider_transaction_id=row.provider_transaction_id,
        provider_batch_id=row.provider_batch_id or "",
        created_at=_req(row.created_at),
        updated_at=_req(row.updated_at),
        requested_by=Actor.of_row(row),
        hold_expire_at=utc(row.hold_expire_at),
    )


def _batch(row: Any, totals: tuple[StateTotal, ...], provider_batch_id: str) -> Batch:
    return Batch(
        batch_id=row.batch_id,
        state=BatchState(row.state),
        currency=row.currency,
        cutoff_time=_req(row.cutoff_time),
        item_count=int(row.item_count),
        diamonds=int(row.diamonds),
        amount_minor=int(row.amount_minor),
        totals=totals,
        created_at=utc(row.created_at),
        submitted_at=utc(row.submitted_at),
        completed_at=utc(row.completed_at),
        provider_batch_id=provider_batch_id,
        created_by=Actor.of_row(row),
    )


def _park(conn: Connection, chunk_id: str, reason: str, now: datetime, *more: sa.ColumnElement[bool]) -> bool:
    """PENDING → PARKED with ``reason``, when ``more`` also holds."""
    moved = conn.execute(
        chunks.update()
        .where(chunks.c.chunk_id == chunk_id, chunks.c.state == ChunkState.PENDING.value, *more)
        .values(state=ChunkState.PARKED.value, park_reason=reason[:512], due_at=now)
    )
    return bool(moved.rowcount)
