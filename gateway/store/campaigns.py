"""Campaigns, their rows and the suppression list, in the calls' database (SQLite or PostgreSQL).

A row goes pending -> dialing -> final. Claiming it (pending -> dialing) is a compare-and-set on
its status that also counts the attempt and names the attempt's Idempotency-Key, in one
transaction, before its call is placed; the call is then found by that key (the calls table's
unique index), so whatever process settles the row later — the one that dialled, or another after
a crash — reads the attempt's call instead of dialling again. PostgreSQL picks rows with
`FOR UPDATE SKIP LOCKED`; SQLite has one writer at a time (SQLAlchemy leaves the clause out).
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import sqlalchemy as sa

from .calls import CAMPAIGN_KEY_ID, CAMPAIGN_KEY_PREFIX, CallRecord, _record as _call_record, as_utc, insert_for, utcnow
from .database import Database
from .jobs import NewJob, schedule_job
from .schema import calls, campaign_rows, campaigns, suppressions

# Campaign statuses.
RUNNING, PAUSED, CANCELED, COMPLETED = "running", "paused", "canceled", "completed"
CAMPAIGN_STATUSES = (RUNNING, PAUSED, CANCELED, COMPLETED)
# Row statuses beyond a call's final ones (completed, busy, no-answer, failed, …).
PENDING, DIALING = "pending", "dialing"
SUPPRESSED, REJECTED, EXPIRED, ROW_CANCELED = "suppressed", "rejected", "expired", "canceled"
INSERT_CHUNK = 1000


@dataclass(frozen=True)
class CampaignRecord:
    id: str
    name: str
    status: str
    api_key_id: str
    spec: dict[str, Any]
    starts_at: dt.datetime | None
    ends_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    ended_at: dt.datetime | None
    pace: float = 1.0  # the share of calls_per_second dispatched now (lowered by Ultravox's 429/503)
    held_until: dt.datetime | None = None  # no dial before (Ultravox's Retry-After)


@dataclass(frozen=True)
class RowRecord:
    id: str
    campaign_id: str
    position: int
    to_number: str
    timezones: tuple[str, ...]
    template_context: dict[str, Any]
    metadata: dict[str, str]
    status: str
    attempts: int
    due_at: dt.datetime
    attempt_key: str | None
    claimed_at: dt.datetime | None
    call_id: str | None
    reason: str | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class NewRow:
    to_number: str
    timezones: tuple[str, ...]
    template_context: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    status: str = PENDING  # or rejected (the dial policy refused it), suppressed
    reason: str | None = None


@dataclass(frozen=True)
class Attempt:
    """A dialing row and its attempt's call as the store has it (None: not recorded yet)."""

    row: RowRecord
    call: CallRecord | None


@dataclass(frozen=True)
class RowChange:
    """What a settled attempt comes to: a final status, or pending again from `due_at` (a retry)."""

    status: str
    reason: str | None = None
    due_at: dt.datetime | None = None
    # Pending again without the attempt counted: its call was never placed (the carrier said so).
    give_back: bool = False


@dataclass(frozen=True)
class Suppression:
    number: str
    reason: str | None
    source: str
    created_at: dt.datetime


@dataclass(frozen=True)
class CampaignChange:
    """What a transaction did to a campaign that its observer (the event outbox) reports."""

    campaign: CampaignRecord  # as it is now
    counts: dict[str, int] | None = None  # rows by status, with started / ended
    started: bool = False
    ended: bool = False
    finished: tuple[RowRecord, ...] = ()  # rows that reached their final status


class CampaignObserver(Protocol):
    def campaign_changed(self, connection: sa.Connection, change: CampaignChange) -> None:
        """Inside the transaction of the change: write what it means (events)."""

    def committed(self) -> None:
        """After the commit of a transaction that called campaign_changed."""


def _report(connection: sa.Connection, observer: CampaignObserver | None, campaign_id: str, *,
            started: bool = False, ended: bool = False, finished: Iterable[RowRecord] = ()) -> None:
    """Tell `observer` (if any) of the change, holding the campaign's row lock so that the campaign's
    events get their order (seq) in commit order, as a call's do (see store.events.lock_calls)."""
    finished = tuple(finished)
    if observer is None or not (started or ended or finished):
        return
    campaign = _get(connection, campaign_id, lock=True)
    assert campaign is not None  # changed in this transaction
    counts = _counts(connection, campaign_id) if started or ended else None
    observer.campaign_changed(connection, CampaignChange(campaign, counts, started, ended, finished))


def _finished(row: RowRecord, now: dt.datetime, **values: Any) -> RowRecord:
    return dataclasses.replace(row, updated_at=now, **values)


def _campaign(row: sa.Row) -> CampaignRecord:
    return CampaignRecord(
        id=row.id, name=row.name, status=row.status, api_key_id=row.api_key_id, spec=json.loads(row.spec_json),
        starts_at=as_utc(row.starts_at) if row.starts_at else None, ends_at=as_utc(row.ends_at) if row.ends_at else None,
        created_at=as_utc(row.created_at), updated_at=as_utc(row.updated_at),
        ended_at=as_utc(row.ended_at) if row.ended_at else None,
        pace=row.pace if row.pace is not None else 1.0, held_until=as_utc(row.held_until) if row.held_until else None,
    )


def _row(row: sa.Row) -> RowRecord:
    return RowRecord(
        id=row.id, campaign_id=row.campaign_id, position=row.position, to_number=row.to_number,
        timezones=tuple(zone for zone in row.timezones.split(",") if zone),
        template_context=json.loads(row.template_context_json or "{}"), metadata=json.loads(row.metadata_json or "{}"),
        status=row.status, attempts=row.attempts, due_at=as_utc(row.due_at), attempt_key=row.attempt_key,
        claimed_at=as_utc(row.claimed_at) if row.claimed_at else None, call_id=row.call_id, reason=row.reason,
        updated_at=as_utc(row.updated_at),
    )


def campaign_of_attempt(key: str) -> str:
    """The campaign of an attempt's key (see attempt_key)."""
    return key.removeprefix(CAMPAIGN_KEY_PREFIX).split(":")[0]


def _row_of(values: dict[str, Any]) -> RowRecord:
    """A row as _create inserts it (its values), read back without a query."""
    return RowRecord(
        id=values["id"], campaign_id=values["campaign_id"], position=values["position"], to_number=values["to_number"],
        timezones=tuple(zone for zone in values["timezones"].split(",") if zone),
        template_context=json.loads(values["template_context_json"] or "{}"),
        metadata=json.loads(values["metadata_json"] or "{}"), status=values["status"], attempts=0,
        due_at=values["due_at"], attempt_key=None, claimed_at=None, call_id=None, reason=values["reason"],
        updated_at=values["updated_at"])


def attempt_key(campaign_id: str, row_id: str, attempt: int) -> str:
    # A claim of its own: an attempt given back (never placed) is claimed again under a new key,
    # since its old key names the failed call.
    return f"{CAMPAIGN_KEY_PREFIX}{campaign_id}:{row_id}:{attempt}:{secrets.token_hex(4)}"


class CampaignStore:
    def __init__(self, database: Database, observer: CampaignObserver | None = None):
        self.database = database
        self.observer = observer

    async def _observed(self, work, *args):
        result = await self.database.transaction(work, *args, self.observer)
        if self.observer is not None:
            self.observer.committed()
        return result

    # --- campaigns ------------------------------------------------------------------------------------
    async def create(self, *, name: str, api_key_id: str, spec: dict[str, Any], starts_at: dt.datetime | None,
                     ends_at: dt.datetime | None, rows: list[NewRow], job: Callable[[str], NewJob]) -> CampaignRecord:
        """The campaign, its rows and its dispatch job (`job(campaign_id)`), in one transaction."""
        return await self._observed(_create, name, api_key_id, spec, starts_at, ends_at, rows, job)

    async def get(self, campaign_id: str) -> CampaignRecord | None:
        return await self.database.transaction(_get, campaign_id)

    async def list(self, limit: int) -> list[CampaignRecord]:
        return await self.database.transaction(_list, limit)

    async def counts(self, campaign_id: str) -> dict[str, int]:
        """How many rows are in each status."""
        return await self.database.transaction(_counts, campaign_id)

    async def rows(self, campaign_id: str, *, status: str | None = None, after: int = -1,
                   limit: int = 100) -> builtins.list[RowRecord]:
        """Rows in list order from position `after` + 1."""
        return await self.database.transaction(_rows, campaign_id, status, after, limit)

    async def change_status(self, campaign_id: str, *, allowed_from: Iterable[str], to: str,
                            job: NewJob | None = None) -> tuple[CampaignRecord | None, bool]:
        """Move the campaign to `to` if it is in one of `allowed_from` (cancel: its pending rows are
        canceled too); `job` is scheduled with the change. (the campaign, whether it changed)."""
        return await self._observed(_change_status, campaign_id, tuple(allowed_from), to, job)

    async def complete_if_done(self, campaign_id: str) -> bool:
        """Running, with no row pending or dialing: completed now (True once)."""
        return await self._observed(_complete_if_done, campaign_id, utcnow())

    async def unfinished(self, limit: int) -> builtins.list[tuple[CampaignRecord, dict[str, int]]]:
        """The newest `limit` campaigns running or paused, each with its rows by status (for /metrics)."""
        return await self.database.transaction(_unfinished, limit)

    # --- pace (AIMD, shared by every replica through the row) ------------------------------------------
    async def back_off(self, campaign_id: str, *, until: dt.datetime, factor: float, floor: float) -> None:
        """Ultravox is over capacity: no dial before `until`, and the pace times `factor` (once per
        hold: the 429s of calls already under way lower it no further)."""
        await self.database.transaction(_back_off, campaign_id, until, factor, floor, utcnow())

    async def speed_up(self, campaign_id: str, *, step: float) -> None:
        """A dispatch run went by without a refusal: the pace `step` higher, up to all of it."""
        await self.database.transaction(_speed_up, campaign_id, step, utcnow())

    # --- rows -----------------------------------------------------------------------------------------
    async def attempts(self, campaign_id: str) -> builtins.list[Attempt]:
        """The dialing rows, each with its attempt's call found by its Idempotency-Key."""
        return await self.database.transaction(_attempts, campaign_id)

    async def settle(self, changes: builtins.list[tuple[RowRecord, RowChange]]) -> int:
        """Apply what attempts came to; a row that moved on meanwhile (another settler) is left alone."""
        return await self._observed(_settle, changes, utcnow())

    async def claim(self, campaign_id: str, *, limit: int, scan: int,
                    not_before: Callable[[RowRecord], dt.datetime | None]) -> builtins.list[RowRecord]:
        """Up to `limit` due pending rows, now dialing (their attempt counted and keyed). Of the first
        `scan` due rows, a suppressed number is suppressed instead, and a row whose window is closed
        (`not_before` gives when it opens; None: open now) waits until then."""
        return await self._observed(_claim, campaign_id, limit, scan, not_before, utcnow())

    async def attach_call(self, row: RowRecord, call_id: str) -> None:
        await self.database.transaction(_attach_call, row, call_id)

    async def live(self, campaign_id: str) -> int:
        """Rows of the campaign with an attempt under way (its call live, or being placed)."""
        return await self.database.transaction(_count_status, campaign_id, DIALING)

    async def next_due(self, campaign_id: str) -> dt.datetime | None:
        return await self.database.transaction(_next_due, campaign_id)

    async def expire(self, campaign_id: str) -> int:
        """Pending rows of a campaign past its ends_at: expired."""
        return await self._observed(_end_pending, campaign_id, EXPIRED, "not dialled before ends_at",
                                               utcnow())

    # --- the suppression list -----------------------------------------------------------------------
    async def suppress(self, numbers: builtins.list[str], *, reason: str | None, source: str) -> int:
        """Add numbers (one already listed stays as it was); returns how many are new."""
        return await self.database.transaction(_suppress, numbers, reason, source, utcnow())

    async def unsuppress(self, number: str) -> bool:
        return await self.database.transaction(_unsuppress, number)

    async def suppressions(self, *, after: str | None, limit: int) -> builtins.list[Suppression]:
        return await self.database.transaction(_suppressions, after, limit)

    async def suppressed(self, numbers: builtins.list[str]) -> set[str]:
        return await self.database.transaction(_suppressed, numbers)


# --- the SQL ---------------------------------------------------------------------------------------------


def _create(connection: sa.Connection, name: str, api_key_id: str, spec: dict[str, Any], starts_at, ends_at,
            rows: list[NewRow], job: Callable[[str], NewJob], observer: CampaignObserver | None) -> CampaignRecord:
    now, campaign_id = utcnow(), str(uuid.uuid4())
    connection.execute(sa.insert(campaigns).values(
        id=campaign_id, name=name, status=RUNNING, api_key_id=api_key_id, spec_json=json.dumps(spec),
        starts_at=starts_at, ends_at=ends_at, created_at=now, updated_at=now))
    due = starts_at or now
    values = [dict(
        id=str(uuid.uuid4()), campaign_id=campaign_id, position=position, to_number=row.to_number,
        timezones=",".join(row.timezones),
        template_context_json=json.dumps(row.template_context) if row.template_context else None,
        metadata_json=json.dumps(row.metadata) if row.metadata else None, status=row.status, attempts=0, due_at=due,
        reason=row.reason, updated_at=now,
    ) for position, row in enumerate(rows)]
    for start in range(0, len(values), INSERT_CHUNK):
        connection.execute(sa.insert(campaign_rows), values[start:start + INSERT_CHUNK])
    schedule_job(connection, job(campaign_id))
    finished = [_row_of(values) for values in values if values["status"] != PENDING] if observer else []
    _report(connection, observer, campaign_id, started=True, finished=finished)
    created = _get(connection, campaign_id)
    assert created is not None  # inserted in this transaction
    return created


def _get(connection: sa.Connection, campaign_id: str, *, lock: bool = False) -> CampaignRecord | None:
    query = sa.select(campaigns).where(campaigns.c.id == campaign_id)
    row = connection.execute(query.with_for_update() if lock else query).first()
    return _campaign(row) if row else None


def _back_off(connection: sa.Connection, campaign_id: str, until: dt.datetime, factor: float, floor: float,
              now: dt.datetime) -> None:
    pace = sa.func.coalesce(campaigns.c.pace, 1.0)
    holding = sa.and_(campaigns.c.held_until.is_not(None), campaigns.c.held_until > now)
    lowered = sa.case((pace * factor < floor, floor), else_=pace * factor)
    connection.execute(sa.update(campaigns).where(campaigns.c.id == campaign_id).values(
        pace=sa.case((holding, pace), else_=lowered),
        held_until=sa.case((sa.and_(holding, campaigns.c.held_until > until), campaigns.c.held_until), else_=until),
        updated_at=now))


def _speed_up(connection: sa.Connection, campaign_id: str, step: float, now: dt.datetime) -> None:
    raised = campaigns.c.pace + step
    connection.execute(sa.update(campaigns).where(
        campaigns.c.id == campaign_id, campaigns.c.pace.is_not(None), campaigns.c.pace < 1.0,
        sa.or_(campaigns.c.held_until.is_(None), campaigns.c.held_until <= now),
    ).values(pace=sa.case((raised >= 1.0, sa.null()), else_=raised)))


def _unfinished(connection: sa.Connection, limit: int) -> list[tuple[CampaignRecord, dict[str, int]]]:
    found = [_campaign(row) for row in connection.execute(
        sa.select(campaigns).where(campaigns.c.status.in_([RUNNING, PAUSED]))
        .order_by(campaigns.c.created_at.desc()).limit(limit))]
    counts: dict[str, dict[str, int]] = {campaign.id: {} for campaign in found}
    if found:
        for campaign_id, status, count in connection.execute(
                sa.select(campaign_rows.c.campaign_id, campaign_rows.c.status, sa.func.count())
                .where(campaign_rows.c.campaign_id.in_(list(counts)))
                .group_by(campaign_rows.c.campaign_id, campaign_rows.c.status)):
            counts[campaign_id][status] = count
    return [(campaign, counts[campaign.id]) for campaign in found]


def _list(connection: sa.Connection, limit: int) -> list[CampaignRecord]:
    query = sa.select(campaigns).order_by(campaigns.c.created_at.desc(), campaigns.c.id.desc()).limit(limit)
    return [_campaign(row) for row in connection.execute(query)]


def _counts(connection: sa.Connection, campaign_id: str) -> dict[str, int]:
    query = (sa.select(campaign_rows.c.status, sa.func.count()).where(campaign_rows.c.campaign_id == campaign_id)
             .group_by(campaign_rows.c.status))
    return {status: count for status, count in connection.execute(query)}


def _rows(connection: sa.Connection, campaign_id: str, status: str | None, after: int, limit: int) -> list[RowRecord]:
    query = sa.select(campaign_rows).where(campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.position > after)
    if status is not None:
        query = query.where(campaign_rows.c.status == status)
    return [_row(row) for row in connection.execute(query.order_by(campaign_rows.c.position).limit(limit))]


def _change_status(connection: sa.Connection, campaign_id: str, allowed_from: tuple[str, ...], to: str,
                   job: NewJob | None, observer: CampaignObserver | None) -> tuple[CampaignRecord | None, bool]:
    now = utcnow()
    values: dict[str, Any] = dict(status=to, updated_at=now)
    if to in (CANCELED, COMPLETED):
        values["ended_at"] = now
    changed = connection.execute(
        sa.update(campaigns).where(campaigns.c.id == campaign_id, campaigns.c.status.in_(allowed_from)).values(**values)
    ).rowcount == 1
    if changed and to == CANCELED:
        _end_pending(connection, campaign_id, ROW_CANCELED, "the campaign was canceled", now, observer, ended=True)
    if changed and job is not None:
        schedule_job(connection, job)
    return _get(connection, campaign_id), changed


def _complete_if_done(connection: sa.Connection, campaign_id: str, now: dt.datetime,
                      observer: CampaignObserver | None) -> bool:
    unfinished = sa.select(campaign_rows.c.id).where(
        campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.status.in_([PENDING, DIALING])).limit(1)
    completed = connection.execute(
        sa.update(campaigns).where(campaigns.c.id == campaign_id, campaigns.c.status == RUNNING, ~sa.exists(unfinished))
        .values(status=COMPLETED, updated_at=now, ended_at=now)
    ).rowcount == 1
    if completed:
        _report(connection, observer, campaign_id, ended=True)
    return completed


def _attempts(connection: sa.Connection, campaign_id: str) -> list[Attempt]:
    # The attempt's call by its key: the calls table's unique (api_key_id, idempotency_key) index.
    joined = campaign_rows.outerjoin(calls, sa.and_(
        calls.c.api_key_id == CAMPAIGN_KEY_ID, calls.c.idempotency_key == campaign_rows.c.attempt_key))
    query = (sa.select(campaign_rows, calls.c.id.label("found_call_id"), *[c.label(f"call__{c.name}") for c in calls.c])
             .select_from(joined)
             .where(campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.status == DIALING))
    found = []
    for result in connection.execute(query):
        call = None
        if result.found_call_id is not None:
            mapping = result._mapping
            call = _call_record(_Columns({c.name: mapping[f"call__{c.name}"] for c in calls.c}))
        found.append(Attempt(_row(result), call))
    return found


class _Columns:
    """A calls row taken out of a joined result, for the calls store's reader."""

    def __init__(self, values: dict[str, Any]):
        self._mapping = values


def _settle(connection: sa.Connection, changes: list[tuple[RowRecord, RowChange]], now: dt.datetime,
            observer: CampaignObserver | None) -> int:
    settled = 0
    finished: dict[str, list[RowRecord]] = {}
    for row, change in changes:
        values: dict[str, Any] = dict(status=change.status, reason=change.reason, updated_at=now)
        if change.due_at is not None:
            values["due_at"] = change.due_at
        if change.give_back:
            values["attempts"] = row.attempts - 1
        changed = connection.execute(
            sa.update(campaign_rows).where(campaign_rows.c.id == row.id, campaign_rows.c.status == DIALING,
                                           campaign_rows.c.attempts == row.attempts).values(**values)
        ).rowcount
        settled += changed
        if changed and change.status != PENDING:
            finished.setdefault(row.campaign_id, []).append(
                _finished(row, now, status=change.status, reason=change.reason))
    for campaign_id, rows in finished.items():
        _report(connection, observer, campaign_id, finished=rows)
    return settled


def _claim(connection: sa.Connection, campaign_id: str, limit: int, scan: int,
           not_before: Callable[[RowRecord], dt.datetime | None], now: dt.datetime,
           observer: CampaignObserver | None) -> list[RowRecord]:
    due = connection.execute(
        sa.select(campaign_rows)
        .where(campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.status == PENDING,
               campaign_rows.c.due_at <= now)
        .order_by(campaign_rows.c.due_at, campaign_rows.c.position)
        .limit(scan)
        .with_for_update(skip_locked=True)
    ).all()
    rows = [_row(row) for row in due]
    blocked = _suppressed(connection, [row.to_number for row in rows])
    claimed: list[RowRecord] = []
    suppressed: list[RowRecord] = []
    for row in rows:
        if row.to_number in blocked:
            reason = "the number is on the suppression list"
            if _set_row(connection, row, status=SUPPRESSED, reason=reason, updated_at=now):
                suppressed.append(_finished(row, now, status=SUPPRESSED, reason=reason))
            continue
        if len(claimed) >= limit:
            continue
        opens = not_before(row)
        if opens is not None:
            _set_row(connection, row, due_at=opens, updated_at=now)
            continue
        attempt = row.attempts + 1
        key = attempt_key(campaign_id, row.id, attempt)
        if _set_row(connection, row, status=DIALING, attempts=attempt, attempt_key=key, claimed_at=now, call_id=None,
                    updated_at=now):
            claimed.append(_get_row(connection, row.id))
    _report(connection, observer, campaign_id, finished=suppressed)
    return claimed


def _set_row(connection: sa.Connection, row: RowRecord, **values: Any) -> bool:
    """Compare-and-set: only if the row is still as read (its status and attempt count)."""
    return connection.execute(
        sa.update(campaign_rows).where(campaign_rows.c.id == row.id, campaign_rows.c.status == row.status,
                                       campaign_rows.c.attempts == row.attempts).values(**values)
    ).rowcount == 1


def _get_row(connection: sa.Connection, row_id: str) -> RowRecord:
    return _row(connection.execute(sa.select(campaign_rows).where(campaign_rows.c.id == row_id)).one())


def _attach_call(connection: sa.Connection, row: RowRecord, call_id: str) -> None:
    connection.execute(sa.update(campaign_rows).where(
        campaign_rows.c.id == row.id, campaign_rows.c.attempt_key == row.attempt_key).values(call_id=call_id))


def _count_status(connection: sa.Connection, campaign_id: str, status: str) -> int:
    return connection.execute(
        sa.select(sa.func.count()).select_from(campaign_rows)
        .where(campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.status == status)
    ).scalar_one()


def _next_due(connection: sa.Connection, campaign_id: str) -> dt.datetime | None:
    due = connection.execute(
        sa.select(sa.func.min(campaign_rows.c.due_at))
        .where(campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.status == PENDING)
    ).scalar()
    return as_utc(due) if due is not None else None


def _end_pending(connection: sa.Connection, campaign_id: str, status: str, reason: str, now: dt.datetime,
                 observer: CampaignObserver | None, *, ended: bool = False) -> int:
    pending = sa.and_(campaign_rows.c.campaign_id == campaign_id, campaign_rows.c.status == PENDING)
    rows = [_row(row) for row in connection.execute(sa.select(campaign_rows).where(pending))] if observer else []
    count = connection.execute(
        sa.update(campaign_rows).where(pending).values(status=status, reason=reason, updated_at=now)).rowcount
    _report(connection, observer, campaign_id, ended=ended,
            finished=[_finished(row, now, status=status, reason=reason) for row in rows])
    return count


def _suppress(connection: sa.Connection, numbers: list[str], reason: str | None, source: str, now: dt.datetime) -> int:
    if not numbers:
        return 0
    statement = (insert_for(connection)(suppressions).on_conflict_do_nothing(index_elements=["number"])
                 .returning(suppressions.c.number))
    values = [dict(number=number, reason=reason, source=source, created_at=now) for number in dict.fromkeys(numbers)]
    added = 0
    for start in range(0, len(values), INSERT_CHUNK):
        added += len(connection.execute(statement, values[start:start + INSERT_CHUNK]).all())
    return added


def _unsuppress(connection: sa.Connection, number: str) -> bool:
    return connection.execute(sa.delete(suppressions).where(suppressions.c.number == number)).rowcount == 1


def _suppressions(connection: sa.Connection, after: str | None, limit: int) -> list[Suppression]:
    query = sa.select(suppressions).order_by(suppressions.c.number).limit(limit)
    if after is not None:
        query = query.where(suppressions.c.number > after)
    return [Suppression(row.number, row.reason, row.source, as_utc(row.created_at)) for row in connection.execute(query)]


def _suppressed(connection: sa.Connection, numbers: list[str]) -> set[str]:
    found: set[str] = set()
    unique = list(dict.fromkeys(numbers))
    for start in range(0, len(unique), INSERT_CHUNK):
        chunk = unique[start:start + INSERT_CHUNK]
        found.update(connection.execute(sa.select(suppressions.c.number).where(suppressions.c.number.in_(chunk))).scalars())
    return found
