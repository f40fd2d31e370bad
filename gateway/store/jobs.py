"""Durable work as rows: what is due when, who holds it, and for how long.

Claiming is one UPDATE over the due rows picked with `FOR UPDATE SKIP LOCKED` (PostgreSQL): two
processes claiming at once get different rows, never the same one. SQLite has one writer at a
time and SQLAlchemy leaves the lock clause out there; the single UPDATE statement is the claim.
Every change after a claim names the claim's attempt count, so a process whose lease ran out
(and whose row another process has claimed since) changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .calls import MAX_REASON, as_utc, utcnow
from .database import Database
from .schema import jobs

PENDING, RUNNING, FAILED = "pending", "running", "failed"


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    key: str | None
    payload: dict[str, Any]
    due_at: dt.datetime
    attempts: int  # including this claim
    lease_owner: str | None


def _job(row: sa.Row) -> Job:
    return Job(
        id=row.id, kind=row.kind, key=row.key, payload=json.loads(row.payload), due_at=as_utc(row.due_at),
        attempts=row.attempts, lease_owner=row.lease_owner,
    )


@dataclass(frozen=True)
class NewJob:
    kind: str
    payload: dict[str, Any]
    due_at: dt.datetime
    key: str | None = None  # at most one job per key
    # With a key: asked for again while the job waits, it runs at the earlier time; while it runs,
    # it runs once more afterwards. (Without: the job already scheduled under the key stands.)
    coalesce: bool = False


def schedule_job(connection: sa.Connection, job: NewJob) -> bool:
    """Add a job inside a transaction the caller already holds (so a business row and the work it
    implies commit together). False: a job with this key exists already, and it stands."""
    now, key = utcnow(), job.key
    values = dict(id=str(uuid.uuid4()), kind=job.kind, key=key, payload=json.dumps(job.payload), status=PENDING,
                  due_at=job.due_at, attempts=0, created_at=now, updated_at=now)
    if key is None:
        connection.execute(sa.insert(jobs).values(**values))
        return True
    statement = _KEYED_INSERTS[(connection.dialect.name, job.coalesce)]
    return connection.execute(statement, values).rowcount == 1 or job.coalesce


def _keyed_insert(dialect: str, coalesce: bool):
    from sqlalchemy.dialects import postgresql, sqlite

    insert = (postgresql if dialect == "postgresql" else sqlite).insert(jobs)
    if not coalesce:
        return insert.on_conflict_do_nothing(index_elements=["key"])
    # The row lock this takes also orders it with a finishing run's `_done` (see there).
    return insert.on_conflict_do_update(index_elements=["key"], set_={
        "due_at": sa.case((jobs.c.due_at > insert.excluded.due_at, insert.excluded.due_at), else_=jobs.c.due_at),
        "rerun": sa.or_(jobs.c.rerun, jobs.c.status == RUNNING),
    })


# The statements of every claim and schedule, built once: building them afresh cost more CPU than
# running them (most of a webhook delivery's cost to the store).
_KEYED_INSERTS = {(dialect, coalesce): _keyed_insert(dialect, coalesce)
                  for dialect in ("postgresql", "sqlite") for coalesce in (False, True)}
_CLAIMABLE = (
    sa.select(jobs.c.id)
    .where(jobs.c.kind.in_(sa.bindparam("kinds", expanding=True)), sa.or_(
        sa.and_(jobs.c.status == PENDING, jobs.c.due_at <= sa.bindparam("now")),
        sa.and_(jobs.c.status == RUNNING, jobs.c.lease_until < sa.bindparam("now")),
    ))
    .order_by(jobs.c.due_at)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    sa.update(jobs)
    .where(jobs.c.id.in_(_CLAIMABLE.scalar_subquery()))
    .values(status=RUNNING, lease_owner=sa.bindparam("owner"), lease_until=sa.bindparam("until"),
            attempts=jobs.c.attempts + 1, updated_at=sa.bindparam("now"))
    .returning(*jobs.c)
)
_DONE = sa.delete(jobs).where(
    jobs.c.id == sa.bindparam("job_id"), jobs.c.attempts == sa.bindparam("held_attempts"), jobs.c.status == RUNNING,
    jobs.c.rerun.is_(False))
_NEXT_DUE = sa.select(sa.func.min(jobs.c.due_at)).where(
    jobs.c.status == PENDING, jobs.c.kind.in_(sa.bindparam("kinds", expanding=True)))


class JobStore:
    def __init__(self, database: Database):
        self.database = database

    async def schedule(self, job: NewJob) -> bool:
        return await self.database.transaction(schedule_job, job)

    async def claim(self, owner: str, *, lease: dt.timedelta, limit: int, kinds: list[str],
                    now: dt.datetime | None = None) -> list[Job]:
        """Due jobs of `kinds`, and those whose holder's lease ran out (it died), now held by `owner`."""
        return await self.database.transaction(_claim, owner, lease, limit, kinds, now or utcnow())

    async def renew(self, owner: str, held: list[Job], *, until: dt.datetime) -> int:
        """Extend the leases `owner` holds on `held` (still its own: not lost and claimed since)."""
        return await self.database.transaction(_renew, owner, held, until)

    async def done(self, job: Job) -> bool:
        """The job ran: deleted (True), or put back to run again at once because it was asked for
        while it ran (False; also when its lease was lost)."""
        return await self.database.transaction(_done, job)

    async def again(self, job: Job, due_at: dt.datetime, error: str | None = None) -> bool:
        """Run it again at `due_at`: a retry after `error`, or a periodic job's next run (attempts reset)."""
        return await self.database.transaction(_again, job, due_at, error)

    async def failed(self, job: Job, error: str) -> bool:
        """Given up: kept for inspection, its key freed."""
        return await self.database.transaction(_failed, job, error)

    async def expedite(self, kind: str, key_prefix: str) -> int:
        """Jobs of `kind` under keys starting with `key_prefix` that wait for later: due now."""
        return await self.database.transaction(_expedite, kind, key_prefix, utcnow())

    async def next_due(self, kinds: list[str]) -> dt.datetime | None:
        """When the earliest pending job of `kinds` is due (to sleep until then)."""
        return await self.database.transaction(_next_due, kinds)

    async def pending(self, kind: str | None = None) -> list[Job]:
        return await self.database.transaction(_pending, kind)


def _held(job: Job):
    return sa.and_(jobs.c.id == job.id, jobs.c.attempts == job.attempts, jobs.c.status == RUNNING)


def _claim(connection: sa.Connection, owner: str, lease: dt.timedelta, limit: int, kinds: list[str],
           now: dt.datetime) -> list[Job]:
    rows = connection.execute(_CLAIM, dict(kinds=kinds, now=now, limit=limit, owner=owner, until=now + lease)).all()
    return sorted((_job(row) for row in rows), key=lambda job: job.due_at)


def _renew(connection: sa.Connection, owner: str, held: list[Job], until: dt.datetime) -> int:
    return connection.execute(
        sa.update(jobs)
        .where(jobs.c.id.in_([job.id for job in held]), jobs.c.lease_owner == owner, jobs.c.status == RUNNING)
        .values(lease_until=until)
    ).rowcount


def _done(connection: sa.Connection, job: Job) -> bool:
    # A coalescing schedule that came while the job ran set `rerun` holding the row's lock; on
    # PostgreSQL this DELETE waits for that lock and then re-checks `rerun` on the row as committed.
    if connection.execute(_DONE, dict(job_id=job.id, held_attempts=job.attempts)).rowcount == 1:
        return True
    _again(connection, job, utcnow(), None)
    return False


def _again(connection: sa.Connection, job: Job, due_at: dt.datetime, error: str | None) -> bool:
    now = utcnow()
    # Asked for again while it ran: not later than now.
    due = sa.case((jobs.c.rerun.is_(True), now), else_=due_at) if due_at > now else due_at
    values: dict[str, Any] = dict(status=PENDING, due_at=due, rerun=False, lease_owner=None, lease_until=None,
                                  updated_at=now)
    if error is None:
        values["attempts"] = 0
    else:
        values["last_error"] = error[:MAX_REASON]
    return connection.execute(sa.update(jobs).where(_held(job)).values(**values)).rowcount == 1


def _failed(connection: sa.Connection, job: Job, error: str) -> bool:
    return connection.execute(
        sa.update(jobs).where(_held(job)).values(status=FAILED, key=None, last_error=error[:MAX_REASON],
                                                  lease_owner=None, lease_until=None, updated_at=utcnow())
    ).rowcount == 1


def _expedite(connection: sa.Connection, kind: str, key_prefix: str, now: dt.datetime) -> int:
    return connection.execute(
        sa.update(jobs)
        .where(jobs.c.kind == kind, jobs.c.status == PENDING, jobs.c.due_at > now,
               jobs.c.key.startswith(key_prefix, autoescape=True))
        .values(due_at=now, updated_at=now)
    ).rowcount


def _next_due(connection: sa.Connection, kinds: list[str]) -> dt.datetime | None:
    due = connection.execute(_NEXT_DUE, dict(kinds=kinds)).scalar()
    return as_utc(due) if due is not None else None


def _pending(connection: sa.Connection, kind: str | None) -> list[Job]:
    query = sa.select(jobs).where(jobs.c.status != FAILED).order_by(jobs.c.due_at)
    if kind is not None:
        query = query.where(jobs.c.kind == kind)
    return [_job(row) for row in connection.execute(query)]
