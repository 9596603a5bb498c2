"""SQL of the notifications inbox and the reconciliation runs.

The inbox is the durability boundary: a notification is acknowledged to the
store only after its row is committed, and the unique key (source, external_id)
makes every redelivery a no-op. Processing claims a row with a lease (a
conditional UPDATE), so two workers never work on the same row at once, and
finishes it with another conditional UPDATE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.clock import as_utc
from services.common.db import Database
from services.common.idempotency import insert_ignore

PENDING = "pending"
FAILED = "failed"
PROCESSED = "processed"
# Gave up (see DeadLetterPolicy); stays visible in the metric, the alert, and for
# `coinstore receipts notifications replay`.
DEAD = "dead"

LEASE = timedelta(seconds=120)
MAX_ATTEMPTS = 25
_BACKOFF_CAP = timedelta(minutes=10)
# Each attempt's error is kept on the row, this long at most.
_ERROR_CHARS = 1000


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff 5 s, 10 s, 20 s … up to ``cap``; dead after ``max_attempts`` attempts
    once the row is at least ``min_age`` old (both must hold)."""

    cap: timedelta = _BACKOFF_CAP
    max_attempts: int = MAX_ATTEMPTS
    min_age: timedelta = timedelta(0)

    def backoff(self, attempts: int) -> timedelta:
        seconds = 5 * 2 ** min(max(0, attempts - 1), 30)
        return min(self.cap, timedelta(seconds=seconds))

    def dead(self, attempts: int, age: timedelta) -> bool:
        return attempts >= self.max_attempts and age >= self.min_age


# Notifications that move money back: a lost one is a missed clawback. The stores
# themselves redeliver for days (Apple about 6.5 days; Pub/Sub up to 7).
REFUND_TYPES = frozenset({("apple", "REFUND"), ("apple", "REFUND_REVERSED"), ("google", "voidedPurchaseNotification")})


@dataclass(frozen=True)
class DeadLetterPolicy:
    """When a failing notification goes ``dead``: refunds and voided purchases retry
    slowly (capped at ``refunds.cap``) for at least ``refunds.min_age`` (7 days);
    the rest after 25 attempts capped at 10 minutes (about three hours)."""

    default: RetryPolicy = RetryPolicy()
    refunds: RetryPolicy = RetryPolicy(cap=timedelta(hours=1), min_age=timedelta(days=7))

    def for_type(self, source: str, notification_type: str) -> RetryPolicy:
        return self.refunds if (source, notification_type) in REFUND_TYPES else self.default


@dataclass(frozen=True)
class NewNotification:
    source: str
    external_id: str
    notification_type: str
    store_transaction_id: str | None
    environment: str | None
    body: str
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class StoredNotification:
    id: int
    source: str
    external_id: str
    notification_type: str
    store_transaction_id: str | None
    environment: str | None
    payload: dict[str, Any]
    state: str
    attempts: int


@dataclass(frozen=True)
class Accepted:
    id: int
    duplicate: bool


def _to_stored(row: Any) -> StoredNotification:
    return StoredNotification(
        id=int(row.id),
        source=row.source,
        external_id=row.external_id,
        notification_type=row.notification_type,
        store_transaction_id=row.store_transaction_id,
        environment=row.environment,
        payload=json.loads(row.payload),
        state=row.state,
        attempts=int(row.attempts),
    )


class InboxRepository:
    def __init__(self, database: Database, policy: DeadLetterPolicy | None = None) -> None:
        self.db = database
        self.policy = policy or DeadLetterPolicy()
        self._notifications = database.table("receipts_notifications")

    def accept(self, item: NewNotification, now: datetime) -> Accepted:
        """Store a verified notification once; a redelivery returns the first row."""
        notifications = self._notifications

        def work(conn: Connection) -> Accepted:
            # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT DO NOTHING.
            # The notification's fields are the row's columns, the payload as JSON text.
            row = {f.name: getattr(item, f.name) for f in fields(item)}
            row["payload"] = json.dumps(item.payload, sort_keys=True, separators=(",", ":"))
            inserted = conn.execute(
                insert_ignore(conn, notifications)
                .values(**row, state=PENDING, attempts=0, received_at=now, next_attempt_at=now)
                .returning(notifications.c.id)
            ).scalar_one_or_none()
            if inserted is not None:
                return Accepted(int(inserted), duplicate=False)
            row_id = conn.execute(
                sa.select(notifications.c.id).where(
                    notifications.c.source == item.source, notifications.c.external_id == item.external_id
                )
            ).scalar_one()
            return Accepted(int(row_id), duplicate=True)

        return self.db.transaction(work)

    def claim(self, notification_id: int, now: datetime) -> StoredNotification | None:
        """Lease an unfinished row for processing; None when it is done or leased elsewhere."""
        notifications = self._notifications

        def work(conn: Connection) -> StoredNotification | None:
            claimed = conn.execute(
                notifications.update()
                .where(
                    notifications.c.id == notification_id,
                    notifications.c.state.in_((PENDING, FAILED)),
                    sa.or_(notifications.c.lease_until.is_(None), notifications.c.lease_until < now),
                )
                .values(lease_until=now + LEASE, attempts=notifications.c.attempts + 1)
            ).rowcount
            if not claimed:
                return None
            row = conn.execute(sa.select(notifications).where(notifications.c.id == notification_id)).one()
            return _to_stored(row)

        return self.db.transaction(work)

    def finish(self, notification_id: int, outcome: str, now: datetime) -> bool:
        notifications = self._notifications

        def work(conn: Connection) -> bool:
            return bool(
                conn.execute(
                    notifications.update()
                    .where(notifications.c.id == notification_id, notifications.c.state != PROCESSED)
                    .values(state=PROCESSED, outcome=outcome, processed_at=now, lease_until=None, last_error=None)
                ).rowcount
            )

        return self.db.transaction(work)

    def fail(self, notification_id: int, error: str, now: datetime) -> tuple[str, timedelta]:
        """Record a failed attempt; returns the new state and the delay before the next one."""
        notifications = self._notifications

        def work(conn: Connection) -> tuple[str, timedelta]:
            row = conn.execute(
                sa.select(
                    notifications.c.attempts,
                    notifications.c.source,
                    notifications.c.notification_type,
                    notifications.c.received_at,
                    notifications.c.attempt_errors,
                ).where(notifications.c.id == notification_id)
            ).one()
            attempts = int(row.attempts)
            policy = self.policy.for_type(row.source, row.notification_type)
            state = DEAD if policy.dead(attempts, now - as_utc(row.received_at)) else FAILED
            delay = policy.backoff(attempts)
            errors = json.loads(row.attempt_errors or "[]")
            errors.append({"attempt": attempts, "at": now.isoformat(), "error": error[:_ERROR_CHARS]})
            conn.execute(
                notifications.update()
                .where(notifications.c.id == notification_id, notifications.c.state != PROCESSED)
                .values(
                    state=state,
                    last_error=error[:2000],
                    attempt_errors=json.dumps(errors),
                    next_attempt_at=now + delay,
                    lease_until=None,
                )
            )
            return state, delay

        return self.db.transaction(work)

    def due(self, now: datetime, pending_grace: timedelta, limit: int = 500) -> list[int]:
        """Rows the sweeper re-queues: failed ones past their backoff, and pending
        ones older than the grace (their first task was lost or is late). Each row
        taken is not due again for another ``pending_grace``: under a backlog its task
        may simply not have run yet, and re-queuing it at every sweep would pile
        duplicates (no-ops, but each a broker message and a transaction) onto the
        backlog."""
        notifications = self._notifications

        def work(conn: Connection) -> list[int]:
            rows = conn.execute(
                sa.select(notifications.c.id)
                .where(
                    sa.or_(
                        sa.and_(notifications.c.state == FAILED, notifications.c.next_attempt_at <= now),
                        sa.and_(
                            notifications.c.state == PENDING,
                            notifications.c.received_at <= now - pending_grace,
                            notifications.c.next_attempt_at <= now,
                        ),
                    ),
                    sa.or_(notifications.c.lease_until.is_(None), notifications.c.lease_until < now),
                )
                .order_by(notifications.c.id)
                .limit(limit)
            ).all()
            ids = [int(r.id) for r in rows]
            if ids:
                conn.execute(
                    notifications.update()
                    .where(notifications.c.id.in_(ids), notifications.c.state.in_((PENDING, FAILED)))
                    .values(next_attempt_at=now + pending_grace)
                )
            return ids

        return self.db.transaction(work)

    def replay(self, now: datetime, ids: Sequence[int] = (), since: datetime | None = None) -> list[int]:
        """Dead rows (those ``ids``, or received since ``since``) back to ``failed``, due
        now, with a fresh attempt budget; their attempt errors stay. The replayed ids."""
        notifications = self._notifications
        if not ids and since is None:
            raise ValueError("replay needs ids or since")
        match = notifications.c.id.in_(list(ids)) if ids else notifications.c.received_at >= since

        def work(conn: Connection) -> list[int]:
            rows = conn.execute(
                notifications.update()
                .where(match, notifications.c.state == DEAD)
                .values(state=FAILED, attempts=0, next_attempt_at=now, lease_until=None)
                .returning(notifications.c.id)
            ).all()
            return sorted(int(r.id) for r in rows)

        return self.db.transaction(work)

    def attempt_errors(self, notification_id: int) -> list[dict[str, Any]]:
        """Every failed attempt's error: attempt number, time (ISO 8601) and error text."""
        notifications = self._notifications
        with self.db.connect() as conn:
            raw = conn.execute(
                sa.select(notifications.c.attempt_errors).where(notifications.c.id == notification_id)
            ).scalar_one()
        errors: list[dict[str, Any]] = json.loads(raw or "[]")
        return errors

    def counts(self) -> dict[str, int]:
        notifications = self._notifications
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(notifications.c.state, sa.func.count()).group_by(notifications.c.state)).all()
        return {str(state): int(count) for state, count in rows}

    def get(self, source: str, external_id: str) -> StoredNotification | None:
        notifications = self._notifications
        with self.db.connect() as conn:
            row = conn.execute(
                sa.select(notifications).where(
                    notifications.c.source == source, notifications.c.external_id == external_id
                )
            ).one_or_none()
        return None if row is None else _to_stored(row)

    def outcome(self, notification_id: int) -> tuple[str, str | None, datetime | None]:
        notifications = self._notifications
        with self.db.connect() as conn:
            row = conn.execute(
                sa.select(notifications.c.state, notifications.c.outcome, notifications.c.processed_at).where(
                    notifications.c.id == notification_id
                )
            ).one()
        return row.state, row.outcome, None if row.processed_at is None else as_utc(row.processed_at)


class ReconcileRunRepository:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._runs = database.table("receipts_reconcile_runs")

    def start(self, source: str, since: datetime, now: datetime) -> int:
        runs = self._runs

        def work(conn: Connection) -> int:
            result = conn.execute(runs.insert().values(source=source, since=since, started_at=now))
            return int(result.inserted_primary_key[0])  # type: ignore[index]

        return self.db.transaction(work)

    def finish(self, run_id: int, examined: int, applied: int, now: datetime) -> None:
        runs = self._runs
        self.db.transaction(
            lambda conn: conn.execute(
                runs.update().where(runs.c.id == run_id).values(finished_at=now, examined=examined, applied=applied)
            )
        )

    def last_finished(self, source: str) -> datetime | None:
        runs = self._runs
        with self.db.connect() as conn:
            value = conn.execute(
                sa.select(sa.func.max(runs.c.started_at)).where(
                    runs.c.source == source, runs.c.finished_at.is_not(None)
                )
            ).scalar_one_or_none()
        return None if value is None else as_utc(value)


@dataclass(frozen=True)
class Cursor:
    """Where one source's reconciliation is: the window being read (the store's
    pagination token belongs to exactly this window) and how far everything has
    been checked (None: never a whole window yet)."""

    source: str
    window_start: datetime
    window_end: datetime
    page_token: str
    checked_through: datetime | None


class CursorRepository:
    """``receipts_reconcile_cursors``: one row per source, saved after every page,
    so a run that stops (quota, rate limit, crash) is resumed by the next."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self._cursors = database.table("receipts_reconcile_cursors")

    def get(self, source: str) -> Cursor | None:
        cursors = self._cursors
        with self.db.connect() as conn:
            row = conn.execute(sa.select(cursors).where(cursors.c.source == source)).one_or_none()
        return None if row is None else _cursor(row)

    def all(self) -> list[Cursor]:
        with self.db.connect() as conn:
            return [_cursor(row) for row in conn.execute(sa.select(self._cursors)).all()]

    def save(self, cursor: Cursor, now: datetime) -> None:
        cursors = self._cursors
        values = {
            "window_start": cursor.window_start,
            "window_end": cursor.window_end,
            "page_token": cursor.page_token or None,
            "checked_through": cursor.checked_through,
            "updated_at": now,
        }

        def work(conn: Connection) -> None:
            conn.execute(insert_ignore(conn, cursors).values(source=cursor.source, **values))
            conn.execute(cursors.update().where(cursors.c.source == cursor.source).values(**values))

        self.db.transaction(work)


def _cursor(row: Any) -> Cursor:
    checked = None if row.checked_through is None else as_utc(row.checked_through)
    return Cursor(row.source, as_utc(row.window_start), as_utc(row.window_end), row.page_token or "", checked)
