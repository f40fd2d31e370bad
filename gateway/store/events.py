"""Events and their deliveries as rows: the outbox the flows write into, the queue deliveries read.

An event is written by the transaction of the change that caused it, with one delivery per
endpoint that wants it. A delivery belongs to a stream (an endpoint and a call): the stream's
deliveries go out one at a time in event order, so a receiver never sees a call end before it
started. Every attempt is kept.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .calls import MAX_REASON, as_utc, insert_for, utcnow
from .database import Database
from .schema import calls, deliveries, delivery_attempts, events, webhook_endpoints

PENDING, DELIVERED, FAILED, SKIPPED = "pending", "delivered", "failed", "skipped"
DELIVERY_STATUSES = [PENDING, DELIVERED, FAILED, SKIPPED]


def new_event_id() -> str:
    # The webhook-id: Standard Webhooks forbids "." in it (it separates the signed parts).
    return f"evt_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class NewEvent:
    """An event to write: its envelope, and the endpoints that want it."""

    type: str
    data: dict[str, Any]
    endpoints: tuple[str, ...]
    call_id: str | None = None
    key: str | None = None  # at most one event per key
    occurred_at: dt.datetime = field(default_factory=utcnow)
    id: str = field(default_factory=new_event_id)

    @property
    def stream(self) -> str:
        return self.call_id or self.id

    def body(self) -> str:
        envelope = {"type": self.type, "timestamp": self.occurred_at.isoformat().replace("+00:00", "Z"),
                    "data": self.data}
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


def lock_calls(connection: sa.Connection, call_ids: list[str]) -> None:
    """Take the calls' row locks (PostgreSQL; SQLite has one writer at a time), as every change of a
    call does before it writes events: a call's events then get their `seq` in commit order, so a
    stream read never finds a later event committed before an earlier one."""
    if call_ids:
        connection.execute(sa.select(calls.c.id).where(calls.c.id.in_(sorted(call_ids))).with_for_update())


def insert_events(connection: sa.Connection, new: list[NewEvent]) -> set[tuple[str, str]]:
    """Write `new` with their deliveries, in a transaction the caller holds (and that holds the
    rows of their calls: see `lock_calls`). Returns the streams (endpoint, stream) that have new
    deliveries. An event whose key exists already is left out."""
    now = utcnow()
    seqs: list[tuple[NewEvent, int]] = []
    if all(event.key is None for event in new):  # one statement for them all, their seqs in order
        inserted = connection.execute(
            sa.insert(events).returning(events.c.seq, sort_by_parameter_order=True), [_event_row(e) for e in new])
        seqs += zip(new, inserted.scalars().all())
    else:  # in order, one by one (an event whose key exists is left out)
        for event in new:
            statement = insert_for(connection)(events).values(**_event_row(event))
            if event.key is not None:
                statement = statement.on_conflict_do_nothing(index_elements=["key"])
            seq = connection.execute(statement.returning(events.c.seq)).scalar()
            if seq is not None:
                seqs.append((event, seq))
    streams: set[tuple[str, str]] = set()
    rows: list[dict[str, Any]] = []
    for event, seq in seqs:
        for endpoint in event.endpoints:
            rows.append(dict(id=str(uuid.uuid4()), event_seq=seq, endpoint=endpoint, stream=event.stream,
                             status=PENDING, attempts=0, created_at=now))
            streams.add((endpoint, event.stream))
    if rows:
        connection.execute(sa.insert(deliveries), rows)
    return streams


def _event_row(event: NewEvent) -> dict[str, Any]:
    return dict(id=event.id, type=event.type, call_id=event.call_id, key=event.key, occurred_at=event.occurred_at,
                body=event.body())


@dataclass(frozen=True)
class Pending:
    """A delivery at the head of its stream, with what it sends."""

    delivery_id: str
    event_id: str
    event_type: str
    occurred_at: dt.datetime
    body: str
    attempts: int  # made so far


@dataclass(frozen=True)
class Attempt:
    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: int


@dataclass(frozen=True)
class Delivery:
    endpoint: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    id: str
    type: str
    call_id: str | None
    occurred_at: dt.datetime
    body: str
    deliveries: tuple[Delivery, ...]

    @property
    def envelope(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass(frozen=True)
class EventFilters:
    call_id: str | None = None
    type: str | None = None
    delivery_status: str | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class EndpointState:
    name: str
    disabled_at: dt.datetime | None
    disabled_reason: str | None


class EventStore:
    def __init__(self, database: Database):
        self.database = database

    async def pending(self, endpoint: str, stream: str, limit: int) -> list[Pending]:
        """The stream's undelivered deliveries, first first."""
        return await self.database.transaction(_pending, endpoint, stream, limit)

    async def attempted(self, outcomes) -> int:
        """Record attempts (each with .pending, .attempt and .status: what the delivery is now,
        pending again, delivered or failed) in one transaction; how many were still as read."""
        if not outcomes:
            return 0
        return await self.database.transaction(_attempted_all, outcomes)

    async def skip_stream(self, endpoint: str, stream: str, reason: str) -> int:
        """Give up the stream's undelivered deliveries without sending them (endpoint disabled or gone)."""
        return await self.database.transaction(_skip_stream, endpoint, stream, reason, utcnow())

    async def disable(self, endpoint: str, reason: str) -> None:
        await self.database.transaction(_set_endpoint, endpoint, utcnow(), reason)

    async def enable(self, endpoint: str) -> None:
        await self.database.transaction(_set_endpoint, endpoint, None, None)

    async def endpoint(self, name: str) -> EndpointState:
        return await self.database.transaction(_endpoint, name)

    async def get(self, event_id: str) -> StoredEvent | None:
        return await self.database.transaction(_get, event_id)

    async def prune(self, before: dt.datetime, limit: int = 1000) -> int:
        """Delete up to `limit` events older than `before` whose deliveries are all settled (none
        pending), with their deliveries and attempts; returns how many."""
        return await self.database.transaction(_prune, before, limit)

    async def list(self, filters: EventFilters, *, limit: int, before_seq: int | None) -> tuple[list[StoredEvent], bool]:
        """Newest first, `limit` a page, from below `before_seq` (the last seq of the page before)."""
        return await self.database.transaction(_list, filters, limit, before_seq)


_PENDING = (
    sa.select(deliveries.c.id, deliveries.c.attempts, events.c.id.label("event_id"), events.c.type,
              events.c.occurred_at, events.c.body)
    .join(events, events.c.seq == deliveries.c.event_seq)
    .where(deliveries.c.endpoint == sa.bindparam("endpoint"), deliveries.c.stream == sa.bindparam("stream"),
           deliveries.c.status == PENDING)
    .order_by(deliveries.c.event_seq)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)


def _pending(connection: sa.Connection, endpoint: str, stream: str, limit: int) -> list[Pending]:
    rows = connection.execute(_PENDING, dict(endpoint=endpoint, stream=stream, limit=limit))
    return [Pending(row.id, row.event_id, row.type, as_utc(row.occurred_at), row.body, row.attempts) for row in rows]


# Built once (executemany with bound values): recording attempts is most of what a delivery costs
# the store, and building the statements afresh each time cost more than running them.
_RECORD_ATTEMPT = (
    sa.update(deliveries)
    .where(deliveries.c.id == sa.bindparam("delivery_id"), deliveries.c.attempts == sa.bindparam("before"),
           deliveries.c.status == PENDING)
    .values(status=sa.bindparam("new_status"), attempts=sa.bindparam("after"),
            last_status_code=sa.bindparam("status_code"), last_error=sa.bindparam("error"),
            last_attempt_at=sa.bindparam("attempted_at"), delivered_at=sa.bindparam("delivered_at"))
)
_INSERT_ATTEMPT = sa.insert(delivery_attempts)


def _attempted_all(connection: sa.Connection, outcomes) -> int:
    rows = [dict(
        delivery_id=o.pending.delivery_id, before=o.pending.attempts, after=o.pending.attempts + 1,
        new_status=o.status, status_code=o.attempt.status_code,
        error=o.attempt.error[:MAX_REASON] if o.attempt.error else None, attempted_at=o.attempt.attempted_at,
        delivered_at=o.attempt.attempted_at if o.status == DELIVERED else None, duration_ms=o.attempt.duration_ms,
    ) for o in outcomes]
    # The stream's job holds its lease, so these rows are its own; the fence only guards against a
    # redelivery asked for meanwhile (which resets the attempts: that delivery goes again).
    recorded = connection.execute(_RECORD_ATTEMPT, rows).rowcount
    connection.execute(_INSERT_ATTEMPT, [
        {name: row[name] for name in ("delivery_id", "attempted_at", "status_code", "error", "duration_ms")}
        for row in rows])
    return recorded


def _skip_stream(connection: sa.Connection, endpoint: str, stream: str, reason: str, now: dt.datetime) -> int:
    return connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.endpoint == endpoint, deliveries.c.stream == stream, deliveries.c.status == PENDING)
        .values(status=SKIPPED, last_error=reason[:MAX_REASON], last_attempt_at=now)
    ).rowcount


def _set_endpoint(connection: sa.Connection, name: str, disabled_at: dt.datetime | None, reason: str | None) -> None:
    values = dict(name=name, disabled_at=disabled_at, disabled_reason=reason, updated_at=utcnow())
    connection.execute(
        insert_for(connection)(webhook_endpoints).values(**values)
        .on_conflict_do_update(index_elements=["name"], set_={k: v for k, v in values.items() if k != "name"})
    )


def _endpoint(connection: sa.Connection, name: str) -> EndpointState:
    row = connection.execute(sa.select(webhook_endpoints).where(webhook_endpoints.c.name == name)).first()
    if row is None:
        return EndpointState(name, None, None)
    return EndpointState(name, as_utc(row.disabled_at) if row.disabled_at else None, row.disabled_reason)


def _time(value: dt.datetime | None) -> dt.datetime | None:
    return as_utc(value) if value is not None else None


def _deliveries_of(connection: sa.Connection, seqs: list[int], with_history: bool) -> dict[int, list[Delivery]]:
    found: dict[int, list[Delivery]] = {seq: [] for seq in seqs}
    if not seqs:
        return found
    rows = connection.execute(
        sa.select(deliveries).where(deliveries.c.event_seq.in_(seqs)).order_by(deliveries.c.endpoint)
    ).all()
    history: dict[str, list[Attempt]] = {}
    if with_history and rows:
        for attempt in connection.execute(
            sa.select(delivery_attempts).where(delivery_attempts.c.delivery_id.in_([row.id for row in rows]))
            .order_by(delivery_attempts.c.id)
        ):
            history.setdefault(attempt.delivery_id, []).append(Attempt(
                as_utc(attempt.attempted_at), attempt.status_code, attempt.error, attempt.duration_ms))
    for row in rows:
        found[row.event_seq].append(Delivery(
            row.endpoint, row.status, row.attempts, row.last_status_code, row.last_error,
            _time(row.last_attempt_at), _time(row.delivered_at), tuple(history.get(row.id, ()))))
    return found


def _stored(row: sa.Row, delivered: list[Delivery]) -> StoredEvent:
    return StoredEvent(row.seq, row.id, row.type, row.call_id, as_utc(row.occurred_at), row.body, tuple(delivered))


def _get(connection: sa.Connection, event_id: str) -> StoredEvent | None:
    row = connection.execute(sa.select(events).where(events.c.id == event_id)).first()
    if row is None:
        return None
    return _stored(row, _deliveries_of(connection, [row.seq], with_history=True)[row.seq])


def _list(connection: sa.Connection, filters: EventFilters, limit: int, before_seq: int | None):
    query = sa.select(events)
    if filters.call_id is not None:
        query = query.where(events.c.call_id == filters.call_id)
    if filters.type is not None:
        query = query.where(events.c.type == filters.type)
    if filters.delivery_status is not None or filters.endpoint is not None:
        matching = sa.select(deliveries.c.event_seq).where(deliveries.c.event_seq == events.c.seq)
        if filters.delivery_status is not None:
            matching = matching.where(deliveries.c.status == filters.delivery_status)
        if filters.endpoint is not None:
            matching = matching.where(deliveries.c.endpoint == filters.endpoint)
        query = query.where(matching.exists())
    if before_seq is not None:
        query = query.where(events.c.seq < before_seq)
    rows = connection.execute(query.order_by(events.c.seq.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    delivered = _deliveries_of(connection, [row.seq for row in page], with_history=False)
    return [_stored(row, delivered[row.seq]) for row in page], len(rows) > limit


def _prune(connection: sa.Connection, before: dt.datetime, limit: int) -> int:
    unsettled = sa.select(deliveries.c.event_seq).where(deliveries.c.event_seq == events.c.seq,
                                                        deliveries.c.status == PENDING)
    seqs = connection.execute(
        sa.select(events.c.seq).where(events.c.occurred_at < before, ~unsettled.exists())
        .order_by(events.c.seq).limit(limit)
    ).scalars().all()
    if not seqs:
        return 0
    owned = sa.select(deliveries.c.id).where(deliveries.c.event_seq.in_(seqs))
    connection.execute(sa.delete(delivery_attempts).where(delivery_attempts.c.delivery_id.in_(owned)))
    connection.execute(sa.delete(deliveries).where(deliveries.c.event_seq.in_(seqs)))
    return connection.execute(sa.delete(events).where(events.c.seq.in_(seqs))).rowcount


def redeliver(connection: sa.Connection, event_id: str, endpoints: list[str]) -> tuple[StoredEvent | None, set[tuple[str, str]]]:
    """Send the event again to `endpoints`: their deliveries pending anew with fresh attempts (an
    endpoint added since gets one). Returns the event and the streams to run."""
    row = connection.execute(sa.select(events).where(events.c.id == event_id)).first()
    if row is None:
        return None, set()
    stream = row.call_id or row.id
    now = utcnow()
    for endpoint in endpoints:
        values = dict(id=str(uuid.uuid4()), event_seq=row.seq, endpoint=endpoint, stream=stream, status=PENDING,
                      attempts=0, created_at=now)
        connection.execute(
            insert_for(connection)(deliveries).values(**values).on_conflict_do_update(
                index_elements=["event_seq", "endpoint"],
                set_=dict(status=PENDING, attempts=0, last_error=None, delivered_at=None))
        )
    return _get(connection, event_id), {(endpoint, stream) for endpoint in endpoints}
