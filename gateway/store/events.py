"""Events and their deliveries as rows: the outbox the flows write into, the queue deliveries read.

An event is written by the transaction of the change that caused it, with one delivery per
endpoint that wants it. A delivery belongs to a stream (an endpoint and a call): the stream's
deliveries go out one at a time in event order, so a receiver never sees a call end before it
started. Each endpoint's dispatcher claims the heads of its streams that are due (`claim`: a
lease, row locks with SKIP LOCKED on PostgreSQL), sends them, and records what they came to in
one transaction per batch (`attempted`). Every attempt is kept.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .calls import MAX_REASON, CallScope, as_utc, insert_for, utcnow
from .database import Database
from .schema import calls, campaigns, deliveries, delivery_attempts, events, webhook_endpoints

PENDING, DELIVERED, FAILED, SKIPPED = "pending", "delivered", "failed", "skipped"
DELIVERY_STATUSES = [PENDING, DELIVERED, FAILED, SKIPPED]
# The status as a literal in the SQL of the queries of pending deliveries: with a bound status,
# SQLite (and PostgreSQL's generic plans) cannot tell that a query wants only what the partial
# ix_deliveries_due holds, and reads all the deliveries of an endpoint instead; the head checks
# took four times as long with one.
_PENDING: sa.ColumnElement[str] = sa.literal_column(f"'{PENDING}'")


def time_ordered_uuid() -> uuid.UUID:
    """A UUID that sorts by when it was made (a UUIDv7: 48 bits of Unix milliseconds, then random
    bits; Python has uuid7 only from 3.14). As a key, each new row's entry lands on the last pages
    of the index instead of a random one: on SQLite, 3.2 pages fewer written a call for the ids of
    its events and deliveries (21.1 against 24.3, with an endpoint)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC 9562 variant
    return uuid.UUID(int=value)


def new_event_id() -> str:
    # The webhook-id: Standard Webhooks forbids "." in it (it separates the signed parts).
    return f"evt_{time_ordered_uuid().hex}"


def new_delivery_id() -> str:
    return str(time_ordered_uuid())


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
    # The deliveries' order: the call's (by default), or another (a campaign's events, its rows' too).
    stream_id: str | None = None

    @property
    def stream(self) -> str:
        return self.stream_id or self.call_id or self.id

    def body(self) -> str:
        envelope = {"type": self.type, "timestamp": self.occurred_at.isoformat().replace("+00:00", "Z"),
                    "data": self.data}
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


# A campaign's events (its rows' too) are one stream, named so (see flows.events.CampaignEvents).
CAMPAIGN_STREAM_PREFIX = "campaign:"


def campaign_stream(campaign_id: str) -> str:
    return f"{CAMPAIGN_STREAM_PREFIX}{campaign_id}"


def _row_locks(connection: sa.Connection) -> bool:
    """Whether the database has row locks to take: SQLite has one writer at a time instead, and
    there the locking read would only be a read."""
    return connection.dialect.name != "sqlite"


def lock_streams(connection: sa.Connection, streams: list[str]) -> None:
    """lock_calls for the streams that are calls', and the campaign's row for a campaign's stream
    (which its writers hold too: see store.campaigns), so a hand-over to a stream's next delivery
    never crosses the insert of one behind it."""
    if not _row_locks(connection):
        return
    lock_calls(connection, [stream for stream in streams if not stream.startswith(CAMPAIGN_STREAM_PREFIX)])
    campaign_ids = sorted(stream.removeprefix(CAMPAIGN_STREAM_PREFIX) for stream in streams
                          if stream.startswith(CAMPAIGN_STREAM_PREFIX))
    if campaign_ids:
        connection.execute(sa.select(campaigns.c.id).where(campaigns.c.id.in_(campaign_ids)).with_for_update())


def lock_calls(connection: sa.Connection, call_ids: list[str]) -> None:
    """Take the calls' row locks (PostgreSQL; SQLite has one writer at a time), as every change of a
    call does before it writes events: a call's events then get their `seq` in commit order, so a
    stream read never finds a later event committed before an earlier one."""
    if call_ids and _row_locks(connection):
        connection.execute(sa.select(calls.c.id).where(calls.c.id.in_(sorted(call_ids))).with_for_update())


def insert_events(connection: sa.Connection, new: list[NewEvent]) -> set[tuple[str, str]]:
    """Write `new` with their deliveries, in a transaction the caller holds (and that holds the
    rows of their calls: see `lock_calls`). Returns the streams (endpoint, stream) that have new
    deliveries. An event whose key exists already is left out."""
    now = utcnow()
    if connection.dialect.name == "postgresql":
        return _insert_events_in_one(connection, new, now)
    if all(event.key is None for event in new):
        # Two executemany statements, the deliveries finding their event's seq by its id: with
        # RETURNING, SQLite would take one statement per row to keep the seqs in order.
        connection.execute(_INSERT_EVENT, [_event_row(event) for event in new])
        written = new
    else:  # one by one: an event whose key exists is left out
        written = []
        for event in new:
            statement = insert_for(connection)(events).values(**_event_row(event))
            if event.key is not None:
                statement = statement.on_conflict_do_nothing(index_elements=["key"])
            if connection.execute(statement).rowcount == 1:
                written.append(event)
    # Only the head of a stream is due; a delivery behind another of its stream still pending waits
    # (due_at NULL) until that one is settled (see _attempted_all). The insert asks whether the
    # stream has one pending (the call's or campaign's row lock, which the caller holds, keeps that
    # read and the hand-over from crossing). Both drivers run an executemany row by row, so a row
    # sees the ones before it; `first` keeps that so were the rows sent as one multi-row INSERT.
    rows: list[dict[str, Any]] = []
    streams: set[tuple[str, str]] = set()
    for event in written:
        for endpoint in event.endpoints:
            first = (endpoint, event.stream) not in streams
            streams.add((endpoint, event.stream))
            rows.append(dict(id=new_delivery_id(), event_id=event.id, endpoint=endpoint, stream=event.stream,
                             status=PENDING, attempts=0, created_at=now, head_due_at=now if first else None,
                             head_endpoint=endpoint, head_stream=event.stream))
    if rows:
        connection.execute(_INSERT_DELIVERY, rows)
    return streams


def _insert_events_in_one(connection: sa.Connection, new: list[NewEvent], now: dt.datetime) -> set[tuple[str, str]]:
    """insert_events as one statement (PostgreSQL): the events inserted in a CTE that returns their
    seqs, and the deliveries selected from it, so the inbound path's transaction makes one round
    trip to the server for its events instead of two. The rows travel as arrays (unnest), so the
    statement's text is the same whatever their number: compiled and prepared once. The events
    are inserted (numbered) in the order of the arrays; no row of the statement sees another, which
    `first` stands in for."""
    planned: list[tuple[str, str, str, str, bool]] = []
    seen: set[tuple[str, str]] = set()
    for event in new:
        for endpoint in event.endpoints:
            planned.append((new_delivery_id(), event.id, endpoint, event.stream, (endpoint, event.stream) not in seen))
            seen.add((endpoint, event.stream))
    event_rows = [_event_row(event) for event in new]
    columns = {name: [row[name] for row in event_rows] for name in _EVENT_COLUMNS}
    inserted = connection.execute(_INSERT_EVENTS_AND_DELIVERIES, dict(
        **{f"event_{name}": values for name, values in columns.items()},
        **{f"delivery_{name}": [row[index] for row in planned] for index, name in enumerate(_DELIVERY_COLUMNS)},
        now=now))
    return {(row.endpoint, row.stream) for row in inserted}


_EVENT_COLUMNS = ("id", "type", "call_id", "key", "occurred_at", "body")
_DELIVERY_COLUMNS = ("id", "event_id", "endpoint", "stream", "first")


def _none_pending(endpoint, stream) -> sa.ColumnElement[bool]:
    """Whether the stream has no delivery pending to the endpoint: a new one is its head. (SELECT 1
    and the status as a literal: on SQLite the check took a quarter of the time of SELECT * with a
    bound status, 4 to 6 us against 15 to 24.)"""
    earlier = deliveries.alias("earlier")
    return ~sa.exists(sa.literal_column("1")).where(
        earlier.c.endpoint == endpoint, earlier.c.stream == stream, earlier.c.status == _PENDING)


def _insert_events_and_deliveries() -> sa.Insert:
    def arrays(prefix: str, types: dict[str, Any]):
        return sa.func.unnest(*(sa.bindparam(f"{prefix}_{name}", type_=postgresql.ARRAY(type_))
                                for name, type_ in types.items()))

    event_types: dict[str, Any] = {name: events.c[name].type for name in _EVENT_COLUMNS}
    new_events = arrays("event", event_types).table_valued(
        *(sa.column(n, t) for n, t in event_types.items()), with_ordinality="position").render_derived(name="new_events")
    written = (
        postgresql.insert(events).from_select(
            list(_EVENT_COLUMNS),
            sa.select(*(new_events.c[name] for name in _EVENT_COLUMNS)).order_by(new_events.c.position))
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(events.c.seq, events.c.id)
        .cte("written")
    )
    delivery_types: dict[str, Any] = {
        "id": sa.String(), "event_id": sa.String(), "endpoint": sa.String(), "stream": sa.String(), "first": sa.Boolean()}
    rows = arrays("delivery", delivery_types).table_valued(
        *(sa.column(n, t) for n, t in delivery_types.items())).render_derived(name="planned")
    head = sa.and_(rows.c.first, _none_pending(rows.c.endpoint, rows.c.stream))
    now = sa.bindparam("now", type_=deliveries.c.created_at.type)
    select = sa.select(
        rows.c.id, written.c.seq, rows.c.endpoint, rows.c.stream, _PENDING,
        sa.literal_column("0"), now, sa.case((head, now), else_=sa.null()),
    ).select_from(rows.join(written, written.c.id == rows.c.event_id))
    return sa.insert(deliveries).from_select(
        ["id", "event_seq", "endpoint", "stream", "status", "attempts", "created_at", "due_at"], select,
    ).returning(deliveries.c.endpoint, deliveries.c.stream)


_INSERT_EVENTS_AND_DELIVERIES = _insert_events_and_deliveries()


_INSERT_EVENT = sa.insert(events)
_INSERT_DELIVERY = sa.insert(deliveries).values(
    event_seq=sa.select(events.c.seq).where(events.c.id == sa.bindparam("event_id")).scalar_subquery(),
    due_at=sa.case(
        # (The row's own endpoint and stream again: an insert's bound values cannot be read in it.)
        (_none_pending(sa.bindparam("head_endpoint"), sa.bindparam("head_stream")),
         sa.bindparam("head_due_at", type_=deliveries.c.due_at.type)),
        else_=sa.null()),
)


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
    due_at: dt.datetime  # when it was due (later than now for a probe: see EventStore.claim)
    endpoint: str
    stream: str


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
    # Only events of calls an API key sees (None: every event, those of no call included).
    scope: CallScope | None = None
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

    async def claim(self, endpoint: str, owner: str, *, lease: dt.timedelta, limit: int,
                    now: dt.datetime | None = None, early: bool = False) -> list[Pending]:
        """Up to `limit` of the endpoint's due deliveries (each the head of its stream: the deliveries
        behind it are not due until it is settled), now held by `owner` until the lease runs out,
        the soonest due first.
        `early`: those waiting for a retry instead, the soonest due first (to probe whether an
        endpoint that failed answers again)."""
        now = now or utcnow()
        return await self.database.transaction(_claim, endpoint, owner, now, now + lease, limit, early)

    async def attempted(self, owner: str, outcomes) -> None:
        """Record attempts (each with .pending, .attempt, .status: what the delivery is now, pending
        again, delivered or failed, and .retry_at for pending) in one transaction, releasing their
        leases. A delivery no longer as `owner` claimed it keeps its state (see _attempted_all)."""
        if outcomes:
            await self.database.transaction(_attempted_all, owner, outcomes)

    async def attempted_and_claim(self, owner: str, outcomes, endpoint: str, *, lease: dt.timedelta,
                                  limit: int) -> list[Pending]:
        """`attempted`, then `claim` (the deliveries they freed included) in the same transaction:
        a dispatcher's turn is one transaction, not two."""
        return await self.database.transaction(_attempted_and_claim, owner, outcomes, endpoint, lease, limit)

    async def skip_endpoint(self, endpoint: str, reason: str) -> int:
        """Give up the endpoint's undelivered deliveries that no one is sending (it is disabled)."""
        return await self.database.transaction(_skip_endpoint, endpoint, reason, utcnow())

    async def expedite(self, endpoint: str) -> int:
        """The endpoint's deliveries waiting for a retry are due now (it answers again)."""
        return await self.database.transaction(_expedite, endpoint, utcnow())

    async def skip_unconfigured(self, configured: list[str], before: dt.datetime) -> int:
        """Give up deliveries still pending since before `before` to endpoints no longer configured.
        (Only old ones: during a rolling deploy, a replica of the previous config sees deliveries to
        an endpoint the new one added.)"""
        return await self.database.transaction(_skip_unconfigured, configured, before, utcnow())

    async def disable(self, endpoint: str, reason: str) -> int:
        """Disable the endpoint and give up its undelivered deliveries that no one is sending, in one
        transaction: whoever reads it disabled finds them settled. Returns how many were given up."""
        return await self.database.transaction(_disable, endpoint, reason, utcnow())

    async def enable(self, endpoint: str) -> None:
        await self.database.transaction(_set_endpoint, endpoint, None, None)

    async def endpoint(self, name: str) -> EndpointState:
        return await self.database.transaction(_endpoint, name)

    async def get(self, event_id: str, scope: CallScope | None = None) -> StoredEvent | None:
        """The event; with `scope`, only if it is of a call the scope covers (else None, as for no event)."""
        return await self.database.transaction(_get, event_id, scope)

    async def prune(self, before: dt.datetime, limit: int = 1000) -> int:
        """Delete up to `limit` events older than `before` whose deliveries are all settled (none
        pending), with their deliveries and attempts; returns how many."""
        return await self.database.transaction(_prune, before, limit)

    async def list(self, filters: EventFilters, *, limit: int, before_seq: int | None) -> tuple[list[StoredEvent], bool]:
        """Newest first, `limit` a page, from below `before_seq` (the last seq of the page before)."""
        return await self.database.transaction(_list, filters, limit, before_seq)


_IS_PENDING = deliveries.c.status == _PENDING


def _not_held(now):
    """No process is sending it: never claimed, or its holder's lease ran out."""
    return sa.or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now)


def _claim_statement(early: bool):
    due = deliveries.c.due_at > sa.bindparam("now") if early else deliveries.c.due_at <= sa.bindparam("now")
    claimable = (
        sa.select(deliveries.c.id)
        .where(deliveries.c.endpoint == sa.bindparam("for_endpoint"), _IS_PENDING, due, _not_held(sa.bindparam("now")))
        .order_by(deliveries.c.due_at, deliveries.c.event_seq)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    )
    return (
        sa.update(deliveries)
        .where(deliveries.c.id.in_(claimable.scalar_subquery()))
        .values(lease_owner=sa.bindparam("owner"), lease_until=sa.bindparam("until"))
        .returning(deliveries.c.id, deliveries.c.event_seq, deliveries.c.attempts, deliveries.c.due_at,
                   deliveries.c.endpoint, deliveries.c.stream)
    )


# Built once (executemany with bound values where there are many): the claims and records are most
# of what a delivery costs the store, and building the statements afresh each time cost more than
# running them.
_CLAIMS = {early: _claim_statement(early) for early in (False, True)}
_CLAIMED_EVENTS = sa.select(events.c.seq, events.c.id, events.c.type, events.c.occurred_at, events.c.body).where(
    events.c.seq.in_(sa.bindparam("seqs", expanding=True)))


def _claim(connection: sa.Connection, endpoint: str, owner: str, now: dt.datetime, until: dt.datetime,
           limit: int, early: bool) -> list[Pending]:
    claimed = connection.execute(_CLAIMS[early], dict(
        for_endpoint=endpoint, now=now, limit=limit, owner=owner, until=until)).all()
    if not claimed:
        return []
    by_seq = {row.seq: row for row in connection.execute(_CLAIMED_EVENTS, dict(seqs=[row.event_seq for row in claimed]))}
    return [Pending(row.id, event.id, event.type, as_utc(event.occurred_at), event.body, row.attempts,
                    as_utc(row.due_at), row.endpoint, row.stream)
            for row in sorted(claimed, key=lambda row: (row.due_at, row.event_seq)) for event in (by_seq[row.event_seq],)]


_RECORD_ATTEMPT = (
    sa.update(deliveries)
    .where(deliveries.c.id == sa.bindparam("delivery_id"), deliveries.c.attempts == sa.bindparam("before"),
           deliveries.c.status == PENDING, deliveries.c.lease_owner == sa.bindparam("owner"))
    .values(status=sa.bindparam("new_status"), attempts=sa.bindparam("after"),
            last_status_code=sa.bindparam("status_code"), last_error=sa.bindparam("error"),
            last_attempt_at=sa.bindparam("attempted_at"), delivered_at=sa.bindparam("delivered_at"),
            due_at=sa.bindparam("next_due"), lease_owner=None, lease_until=None)
)
_INSERT_ATTEMPT = sa.insert(delivery_attempts)
# The stream's first pending delivery, if it is waiting (it is the one settled when the record was
# fenced off, and then due already: left alone).
_next = deliveries.alias("next_delivery")
_HAND_ON = sa.update(deliveries).where(
    deliveries.c.id == sa.select(_next.c.id).where(
        _next.c.endpoint == sa.bindparam("for_endpoint"), _next.c.stream == sa.bindparam("for_stream"),
        _next.c.status == PENDING).order_by(_next.c.event_seq).limit(1).scalar_subquery(),
    deliveries.c.due_at.is_(None),
).values(due_at=sa.bindparam("handed_at"))


def _attempted_all(connection: sa.Connection, owner: str, outcomes) -> None:
    rows = [dict(
        delivery_id=o.pending.delivery_id, owner=owner, before=o.pending.attempts,
        # A probe that failed leaves the schedule as it was: its retry stays where it was due.
        after=o.pending.attempts + (0 if o.probe_failed else 1),
        new_status=o.status, status_code=o.attempt.status_code,
        error=o.attempt.error[:MAX_REASON] if o.attempt.error else None, attempted_at=o.attempt.attempted_at,
        delivered_at=o.attempt.attempted_at if o.status == DELIVERED else None, duration_ms=o.attempt.duration_ms,
        next_due=o.pending.due_at if o.probe_failed else o.retry_at or o.attempt.attempted_at,
    ) for o in outcomes]
    # The fence: a holder whose lease ran out (another process claimed the delivery and may have
    # recorded it first) and a redelivery asked for meanwhile (it releases the claim: the delivery
    # goes again) change nothing here; the attempt itself is kept either way.
    settled = sorted({(o.pending.endpoint, o.pending.stream) for o in outcomes if o.status != PENDING})
    # Before anything else, as every writer of a call's events: see insert_events.
    lock_streams(connection, [stream for _, stream in settled])
    connection.execute(_RECORD_ATTEMPT, rows)
    connection.execute(_INSERT_ATTEMPT, [
        {name: row[name] for name in ("delivery_id", "attempted_at", "status_code", "error", "duration_ms")}
        for row in rows])
    if settled:  # the next delivery of each settled stream is due now
        now = utcnow()
        connection.execute(_HAND_ON, [dict(for_endpoint=endpoint, for_stream=stream, handed_at=now)
                                      for endpoint, stream in settled])


def _attempted_and_claim(connection: sa.Connection, owner: str, outcomes, endpoint: str, lease: dt.timedelta,
                         limit: int) -> list[Pending]:
    if outcomes:
        _attempted_all(connection, owner, outcomes)
    if limit <= 0:
        return []
    now = utcnow()  # after the hand-over's: the deliveries it made due are claimed too
    return _claim(connection, endpoint, owner, now, now + lease, limit, early=False)


def _skip_endpoint(connection: sa.Connection, endpoint: str, reason: str, now: dt.datetime) -> int:
    return connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.endpoint == endpoint, _IS_PENDING, _not_held(now))
        .values(status=SKIPPED, last_error=reason[:MAX_REASON], last_attempt_at=now)
    ).rowcount


def _expedite(connection: sa.Connection, endpoint: str, now: dt.datetime) -> int:
    return connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.endpoint == endpoint, _IS_PENDING, deliveries.c.due_at > now)
        .values(due_at=now)
    ).rowcount


def _skip_unconfigured(connection: sa.Connection, configured: list[str], before: dt.datetime, now: dt.datetime) -> int:
    return connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.endpoint.not_in(configured), _IS_PENDING, deliveries.c.created_at < before,
               _not_held(now))
        .values(status=SKIPPED, last_error="the endpoint is no longer configured", last_attempt_at=now)
    ).rowcount


def _disable(connection: sa.Connection, endpoint: str, reason: str, now: dt.datetime) -> int:
    _set_endpoint(connection, endpoint, now, reason)
    return _skip_endpoint(connection, endpoint, f"the endpoint is disabled: {reason}", now)


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


def _within(query: sa.Select, scope: CallScope | None) -> sa.Select:
    if scope is None:
        return query
    return query.where(events.c.call_id.in_(sa.select(calls.c.id).where(scope.clause())))


def _get(connection: sa.Connection, event_id: str, scope: CallScope | None = None) -> StoredEvent | None:
    row = connection.execute(_within(sa.select(events).where(events.c.id == event_id), scope)).first()
    if row is None:
        return None
    return _stored(row, _deliveries_of(connection, [row.seq], with_history=True)[row.seq])


def _list(connection: sa.Connection, filters: EventFilters, limit: int, before_seq: int | None):
    query = _within(sa.select(events), filters.scope)
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


def redeliver(connection: sa.Connection, event_id: str, endpoints: list[str]) -> StoredEvent | None:
    """Send the event again to `endpoints`: their deliveries pending anew, due now, with fresh
    attempts (an endpoint added since gets one). Returns the event."""
    row = connection.execute(sa.select(events).where(events.c.id == event_id)).first()
    if row is None:
        return None
    stream = row.call_id or row.id
    now = utcnow()
    for endpoint in endpoints:
        values = dict(id=new_delivery_id(), event_seq=row.seq, endpoint=endpoint, stream=stream, status=PENDING,
                      attempts=0, created_at=now, due_at=now)
        connection.execute(
            insert_for(connection)(deliveries).values(**values).on_conflict_do_update(
                index_elements=["event_seq", "endpoint"],
                # Released: a dispatcher sending it at this moment records nothing (see _attempted_all).
                set_=dict(status=PENDING, attempts=0, last_error=None, delivered_at=None, due_at=now,
                          lease_owner=None, lease_until=None))
        )
    return _get(connection, event_id)
