"""Transfer records: one active transfer per call, and what became of each."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import sqlalchemy as sa

from .calls import ChangeObserver, as_utc, insert_for, utcnow
from .database import Database
from .jobs import NewJob, schedule_job
from .schema import calls, transfers

REQUESTED = "requested"
DIALING = "dialing"
RETURNING = "returning"  # a new Ultravox call is being created to take the caller back
CONNECTED = "connected"  # the caller is talking with a person
RETURNED = "returned"  # the caller is back with the agent
FAILED = "failed"  # the caller could not be moved (the agent still has them) or was lost
FINAL = {CONNECTED, RETURNED, FAILED}


@dataclass(frozen=True)
class TransferRecord:
    id: str
    call_id: str
    kind: str
    operator: str
    operators_tried: str
    reason: str
    summary: str | None
    status: str
    outcome: str | None
    operator_leg_id: str | None
    leg: int
    prior_ultravox_call_id: str | None
    new_ultravox_call_id: str | None
    active_call_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    answered_at: dt.datetime | None
    ended_at: dt.datetime | None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    @property
    def tried(self) -> tuple[str, ...]:
        return tuple(name for name in self.operators_tried.split(",") if name)


@dataclass(frozen=True)
class TransferChange:
    """What a step of the transfer changes (None: unchanged)."""

    status: str | None = None
    operator: str | None = None  # the operator being tried now
    tried: tuple[str, ...] | None = None  # every operator tried so far, in order
    outcome: str | None = None
    operator_leg_id: str | None = None
    new_ultravox_call_id: str | None = None

    def columns(self) -> dict[str, Any]:
        values = {name: value for name, value in asdict(self).items() if value is not None}
        if "tried" in values:
            values["operators_tried"] = _encode_tried(values.pop("tried"))
        return values


@dataclass(frozen=True)
class TransferExpectation:
    """The state a change expects to find (a compare-and-set): of two deliveries of one carrier
    event, or two events racing, only one changes the transfer."""

    status: str | None = None
    leg: int | None = None
    tried: tuple[str, ...] | None = None

    def columns(self) -> dict[str, Any]:
        return TransferChange(status=self.status, tried=self.tried).columns() | (
            {"leg": self.leg} if self.leg is not None else {})


def _encode_tried(names: tuple[str, ...]) -> str:
    return ",".join(names)


_COLUMNS = [f.name for f in fields(TransferRecord)]


def _transfer(row: sa.Row) -> TransferRecord:
    data = dict(row._mapping)
    for name in ("created_at", "updated_at", "answered_at", "ended_at"):
        if data[name] is not None:
            data[name] = as_utc(data[name])
    return TransferRecord(**{name: data[name] for name in _COLUMNS})


class TransferStore:
    def __init__(self, database: Database, observer: ChangeObserver | None = None):
        self.database = database
        self.observer = observer  # sees transfers start and end (see CallStore)

    async def _observed(self, work, *args):
        result = await self.database.transaction(work, *args, self.observer)
        if self.observer is not None:
            self.observer.committed()
        return result

    async def start(
        self, *, call_id: str, kind: str, operator: str, reason: str, summary: str | None, prior_ultravox_call_id: str | None,
        then: Callable[[str], NewJob] | None = None,
    ) -> TransferRecord | None:
        """A new transfer, or None when the call already has one under way. `then(transfer_id)`: the
        durable work that starts it, written in the same transaction (so neither exists without the other)."""
        now = utcnow()
        transfer_id = str(uuid.uuid4())
        values = dict(
            id=transfer_id, call_id=call_id, kind=kind, operator=operator, operators_tried=_encode_tried((operator,)),
            reason=reason, summary=summary, status=REQUESTED, leg=0, prior_ultravox_call_id=prior_ultravox_call_id,
            active_call_id=call_id, created_at=now, updated_at=now,
        )
        return await self._observed(_start, values, then(transfer_id) if then else None)

    async def get(self, transfer_id: str) -> TransferRecord | None:
        return await self.database.transaction(_get, transfer_id)

    async def existing(self, transfer_id: str) -> TransferRecord:
        """A transfer the gateway has recorded (transfers are never deleted: LookupError means a wrong id)."""
        transfer = await self.get(transfer_id)
        if transfer is None:
            raise LookupError(f"transfer {transfer_id} is not in the store")
        return transfer

    async def for_call(self, call_id: str) -> list[TransferRecord]:
        return await self.database.transaction(_for_call, call_id)

    async def live_transfers(self, since: dt.datetime) -> list[tuple[str, int]]:
        """(kind, count) of transfers under way (holding their call's active_call_id), started since
        `since`: read from an index of those alone."""
        return await self.database.transaction(_live_transfers, since)

    async def update(
        self, transfer_id: str, change: TransferChange, *, only_if_active: bool = True,
        expect: TransferExpectation | None = None,
    ) -> TransferRecord | None:
        """Change a transfer, if it is still under way and still as `expect`ed. Returns the record
        after the change, or None when the change was refused."""
        return await self._write(transfer_id, change.columns(), only_if_active, expect)

    async def _write(self, transfer_id: str, values: dict[str, Any], only_if_active: bool,
                     expect: TransferExpectation | None) -> TransferRecord | None:
        expected = expect.columns() if expect else {}
        return await self._observed(_update, transfer_id, only_if_active, expected, values, utcnow())

    async def release_leg(self, transfer_id: str, leg: int, then: NewJob | None = None) -> TransferRecord | None:
        """Move past operator leg `leg`; None if another event did first, or the transfer ended.
        `then`: durable work written with the move (the next leg's deadline)."""
        return await self.database.transaction(_release_leg, transfer_id, leg, utcnow(), then)

    async def finish(
        self, transfer_id: str, status: str, outcome: str, *, expect: TransferExpectation | None = None,
        only_if_active: bool = True, new_ultravox_call_id: str | None = None,
    ) -> TransferRecord | None:
        """End a transfer once; None when it had already ended (a repeated or late event).

        `only_if_active=False`: the transfer already gave up its slot (it is returning the caller).
        """
        values = TransferChange(status=status, outcome=outcome, new_ultravox_call_id=new_ultravox_call_id).columns()
        values["active_call_id"] = None
        values["answered_at" if status == CONNECTED else "ended_at"] = utcnow()
        return await self._write(transfer_id, values, only_if_active, expect)

    async def mark_ended(self, transfer_id: str) -> None:
        """The caller's conversation with the operator is over."""
        await self._write(transfer_id, {"ended_at": utcnow()}, False, None)


def _observe(connection: sa.Connection, observer: ChangeObserver | None, before: TransferRecord | None,
             after: TransferRecord | None) -> None:
    if observer is None or after is None:
        return
    # Under the call's row lock, like every change of the call itself: its events take their
    # places in the call's order one transaction at a time, in the order they commit.
    route = connection.execute(sa.select(calls.c.route).where(calls.c.id == after.call_id).with_for_update()).scalar()
    effects = observer.transfer_changed(before, after, route)
    if effects:
        observer.write(connection, effects)


def _start(connection: sa.Connection, values: dict, then: NewJob | None,
           observer: ChangeObserver | None) -> TransferRecord | None:
    inserted = connection.execute(
        insert_for(connection)(transfers).values(**values)
        .on_conflict_do_nothing(index_elements=["active_call_id"]).returning(transfers.c.id)
    ).first()
    # Nothing inserted: another transfer of this call holds active_call_id.
    if not inserted:
        return None
    if then is not None:
        schedule_job(connection, then)
    started = _get(connection, values["id"])
    _observe(connection, observer, None, started)
    return started


def _get(connection: sa.Connection, transfer_id: str, *, lock: bool = False) -> TransferRecord | None:
    query = sa.select(transfers).where(transfers.c.id == transfer_id)
    row = connection.execute(query.with_for_update() if lock else query).first()
    return _transfer(row) if row else None


def _for_call(connection: sa.Connection, call_id: str) -> list[TransferRecord]:
    rows = connection.execute(
        sa.select(transfers).where(transfers.c.call_id == call_id).order_by(transfers.c.created_at)
    )
    return [_transfer(row) for row in rows]


def live_transfers_query(since: dt.datetime) -> sa.Select:
    return (
        sa.select(transfers.c.kind, sa.func.count())
        .where(transfers.c.active_call_id.is_not(None), transfers.c.created_at >= since)
        .group_by(transfers.c.kind)
    )


def _live_transfers(connection: sa.Connection, since: dt.datetime) -> list[tuple[str, int]]:
    return [(kind, count) for kind, count in connection.execute(live_transfers_query(since))]


def _release_leg(connection: sa.Connection, transfer_id: str, leg: int, now: dt.datetime, then: NewJob | None):
    released = connection.execute(
        sa.update(transfers)
        .where(transfers.c.id == transfer_id, transfers.c.leg == leg, transfers.c.active_call_id.is_not(None))
        .values(leg=leg + 1, operator_leg_id=None, updated_at=now)
    ).rowcount == 1
    if not released:
        return None
    if then is not None:
        schedule_job(connection, then)
    return _get(connection, transfer_id)


def _update(
    connection: sa.Connection, transfer_id: str, only_if_active: bool, expect: dict, values: dict, now: dt.datetime,
    observer: ChangeObserver | None,
):
    before = _get(connection, transfer_id, lock=True) if observer is not None and "status" in values else None
    statement = sa.update(transfers).where(transfers.c.id == transfer_id)
    if only_if_active:
        statement = statement.where(transfers.c.active_call_id.is_not(None))
    for column, value in expect.items():
        statement = statement.where(transfers.c[column] == value)
    if connection.execute(statement.values(updated_at=now, **values)).rowcount != 1:
        return None
    after = _get(connection, transfer_id)
    if before is not None:
        _observe(connection, observer, before, after)
    return after
