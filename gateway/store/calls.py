"""Call records in SQLite (default) or PostgreSQL: the async API flows use, the SQL it runs."""

from __future__ import annotations

import builtins
import asyncio
import contextlib
import datetime as dt
import json
import time
import uuid
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePath
from typing import Any, Mapping, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..statuses import ANSWERED, CREATING, FAILED, FINAL_STATUSES, IN_PROGRESS, QUEUED, STATUS_RANK
from .database import MIGRATION_LOCK_KEY, Database
from .schema import MIGRATIONS, calls, campaigns, schema_version, webhook_replays

# The calls of every campaign are recorded under this API key id (never a real one: those are hex),
# with idempotency keys "campaign:{campaign id}:…" (gateway.store.campaigns).
CAMPAIGN_KEY_ID = "campaigns"
CAMPAIGN_KEY_PREFIX = "campaign:"


@dataclass(frozen=True)
class CallRecord:
    id: str
    direction: str
    carrier: str
    carrier_call_id: str | None
    from_number: str
    to_number: str
    route: str | None
    ultravox_call_id: str | None
    join_url: str | None
    status: str
    failure_reason: str | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    via: str | None = None
    end_reason: str | None = None
    answered_by: str | None = None
    duration_seconds: int | None = None
    summary: str | None = None
    api_key_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    request_json: str | None = None
    answered_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    agent_claimed_at: dt.datetime | None = None
    media_stats: str | None = None
    recording_path: str | None = None
    media_token: str | None = None
    placed_at: dt.datetime | None = None
    lease_owner: str | None = None
    lease_until: dt.datetime | None = None
    stream_expires: int | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def request(self) -> dict[str, Any] | None:
        """What an outbound call was asked for (the dial request and its route), as recorded."""
        return json.loads(self.request_json) if self.request_json else None

    @property
    def media(self) -> dict[str, int] | None:
        """Bridge mode: the call's audio counters."""
        return json.loads(self.media_stats) if self.media_stats else None

    @property
    def recordings(self) -> list[str]:
        """Bridge mode: one WAV per stretch of the call (a return from a transfer starts another)."""
        return _paths(self.recording_path)


def _paths(stored: str | None) -> list[str]:
    return [path for path in (stored or "").split(",") if path]


# Failure reasons are stored bounded: they may quote a remote error.
MAX_REASON = 500


@dataclass(frozen=True)
class CallUpdate:
    """What a flow learnt about a call. The status moves forward only (events come late and twice);
    the details fill in what is not known yet and never overwrite it."""

    status: str | None = None
    # A final status that a carrier's own final status may still correct (Ultravox saying nobody
    # joined, while the carrier knows it was busy).
    provisional: bool = False
    carrier_call_id: str | None = None
    ultravox_call_id: str | None = None
    join_url: str | None = None
    failure_reason: str | None = None
    end_reason: str | None = None
    answered_by: str | None = None
    duration_seconds: int | None = None
    summary: str | None = None
    placed: bool = False  # outbound: the carrier (or Ultravox) accepted the dial

    def details(self) -> dict[str, Any]:
        values = asdict(self)
        del values["status"], values["provisional"], values["placed"]
        if self.placed:
            values["placed_at"] = utcnow()
        if values["failure_reason"]:
            values["failure_reason"] = values["failure_reason"][:MAX_REASON]
        return {name: value for name, value in values.items() if value is not None}


_COLUMNS = [f.name for f in fields(CallRecord)]


@dataclass(frozen=True)
class Claim:
    record: CallRecord
    owned: bool  # True: this caller must create the Ultravox call; False: someone else did or is


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def as_utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


class _RowLike(Protocol):
    """A result row, or the calls columns taken out of a joined one (campaigns)."""

    @property
    def _mapping(self) -> Mapping[Any, Any]: ...


def _record(row: _RowLike) -> CallRecord:
    data = dict(row._mapping)
    for name in ("created_at", "updated_at", "answered_at", "ended_at", "agent_claimed_at", "placed_at", "lease_until"):
        if data[name] is not None:
            data[name] = as_utc(data[name])
    return CallRecord(**{name: data[name] for name in _COLUMNS})


class ChangeObserver(Protocol):
    """Told of each change of a call (or transfer) inside the transaction that makes it, it answers
    with what the change implies (events, jobs), written by `write` in that same transaction."""

    def call_changed(self, before: "CallRecord | None", after: "CallRecord") -> list: ...

    def transfer_changed(self, before, after, route: str | None) -> list: ...

    def write(self, connection: sa.Connection, effects: list) -> None: ...

    def committed(self) -> None: ...


class CallStore:
    def __init__(self, database: Database, observer: ChangeObserver | None = None):
        self.database = database
        self._writer = _GroupCommit(self._apply)
        # Set before the first write (the outbox needs the durable work, which needs the store).
        self.observer = observer

    async def _observed(self, work, *args, urgent: bool = False):
        """A transaction whose changes the observer sees (and whose effects it then looks for)."""
        result = await self.database.transaction(work, *args, self.observer, urgent=urgent)
        if self.observer is not None:
            self.observer.committed()
        return result

    @classmethod
    def open(cls, database_url: str) -> "CallStore":
        return cls(Database.open(database_url))

    async def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        return await self.database.transaction(_migrate)

    def writer_stalled_for(self) -> float:
        """Seconds the store's writer has been stuck in one transaction past its deadline (else 0)."""
        return self._writer.stalled_for()

    async def ping(self) -> None:
        await self.database.transaction(lambda connection: connection.execute(sa.text("SELECT 1")))

    async def close(self) -> None:
        await self._writer.close()
        await self.database.close()

    # --- inbound calls ------------------------------------------------------------------------------
    async def claim_inbound(
        self,
        *,
        carrier: str,
        carrier_call_id: str,
        from_number: str,
        to_number: str,
        route: str | None,
        status: str = CREATING,
        failure_reason: str | None = None,
        stale_after: dt.timedelta,
        owner: str | None = None,
    ) -> Claim:
        """Record a carrier call once. The first delivery owns it; retries see the first record.

        The owner (`owner`, a process) holds a `creating` record for `stale_after`: it finishes it
        within that time (the carrier's deadline is shorter). A record left `failed` is handed to the
        next delivery so a carrier retry gets a fresh attempt; one left `creating` past its lease is
        not (its Ultravox call may exist): the caller settles it first (`settle_creating`).
        """
        now = utcnow()
        values = dict(
            id=str(uuid.uuid4()),
            direction="inbound",
            carrier=carrier,
            carrier_call_id=carrier_call_id,
            from_number=from_number,
            to_number=to_number,
            route=route,
            status=status,
            status_rank=STATUS_RANK[status],
            failure_reason=failure_reason,
            attempts=1,
            created_at=now,
            updated_at=now,
            lease_owner=owner if status == CREATING else None,
            lease_until=now + stale_after if status == CREATING else None,
        )
        return await self._writer.submit(_Write("claim", values, stale_after))

    async def remember_delivery(self, carrier: str, key: str, *, keep_for: dt.timedelta) -> "Remembered":
        """Whether this is the first time a signed webhook with `key` (its one-time part) came, and
        if not, the first one's answer (once sent); it is remembered for `keep_for`, on every
        replica. Batched with the inbound writes."""
        now = utcnow()
        values = {"carrier": carrier, "key": key, "seen_at": now, "expires_at": now + keep_for}
        return await self._writer.submit(_Write("seen", values))

    async def remember_answer(self, carrier: str, key: str, answer: "StoredAnswer") -> None:
        """What the first delivery with `key` was answered (for its repeats); batched like the rest."""
        values = {"answer_carrier": carrier, "answer_key": key, "new_status_code": answer.status_code,
                  "new_media_type": answer.media_type, "new_answer": answer.body}
        await self._writer.submit(_Write("answer", values))

    async def forget_deliveries(self, *, before: dt.datetime, limit: int = 5000) -> int:
        """Forget webhooks remembered until before `before` (a replay of them is refused by its
        carrier's own check by then); returns how many."""
        return await self.database.transaction(_forget_deliveries, before, limit)

    async def mark_connected(self, call_id: str, *, ultravox_call_id: str, join_url: str,
                             stream_expires: int | None = None) -> None:
        """`stream_expires`: bridge mode, the expiry of the media token its answer carries."""
        await self._set_outcome(call_id, IN_PROGRESS, ultravox_call_id=ultravox_call_id, join_url=join_url,
                                stream_expires=stream_expires)

    async def mark_failed(self, call_id: str, reason: str) -> None:
        await self._set_outcome(call_id, FAILED, failure_reason=reason[:MAX_REASON])

    async def _set_outcome(self, call_id: str, status: str, **values: Any) -> None:
        outcome = {"call_id": call_id, "new_status": status, "new_rank": STATUS_RANK[status], "now": utcnow()}
        outcome.update({f"new_{name}": values.get(name)
                        for name in ("ultravox_call_id", "join_url", "failure_reason", "stream_expires")})
        await self._writer.submit(_Write("outcome", outcome))

    async def get(self, call_id: str) -> CallRecord | None:
        return await self.database.transaction(_get, call_id)

    async def get_within(self, call_id: str, scope: CallScope | None) -> CallRecord | None:
        """The call if `scope` (an API key's) covers it; None as for an unknown id (existence does not leak)."""
        return await self.database.transaction(_get_within, call_id, scope)

    async def existing(self, call_id: str) -> CallRecord:
        """A call the gateway has recorded (calls are never deleted: LookupError means a wrong id)."""
        record = await self.get(call_id)
        if record is None:
            raise LookupError(f"call {call_id} is not in the store")
        return record

    # --- outbound calls and call tracking ---------------------------------------------------------------
    async def create_outbound(
        self, values: dict, *, request: Mapping[str, Any], max_recent: int | None, window: dt.timedelta
    ) -> "OutboundInsert":
        """Record a dial request (`request`: what was asked, kept for when the call is answered) once
        per idempotency key, within the key's dialling rate."""
        now = utcnow()
        values = dict(values, request_json=json.dumps(request), id=str(uuid.uuid4()), direction="outbound", status=QUEUED,
                      status_rank=STATUS_RANK[QUEUED], attempts=1, created_at=now, updated_at=now)
        return await self._observed(_create_outbound, values, max_recent, now - window)

    async def update(self, call_id: str, change: CallUpdate) -> "Updated":
        """Apply what a flow learnt about the call (see CallUpdate)."""
        status, rank = change.status, None
        if status is not None:
            rank = STATUS_RANK[status] - (1 if change.provisional and status in FINAL_STATUSES else 0)
        return await self._observed(_update, call_id, status, rank, change.details(), {}, utcnow())

    async def rejoin(self, call_id: str, *, ultravox_call_id: str, join_url: str) -> None:
        """The call is with a new Ultravox call now (back from a transfer)."""
        replace = {"ultravox_call_id": ultravox_call_id, "join_url": join_url}
        await self._observed(_update, call_id, None, None, {}, replace, utcnow())

    async def record_media(self, call_id: str, stats: Mapping[str, int]) -> None:
        """A bridged stretch of the call ended: its audio counters."""
        await self.database.transaction(_record_media, call_id, json.dumps(dict(stats)), utcnow())

    async def add_recording(self, call_id: str, path: str) -> None:
        """A bridged stretch of the call started recording into `path` (listed at once, so that a
        crash mid-call leaves the file findable)."""
        await self.database.transaction(_change_recordings, call_id, lambda paths: [*paths, path], utcnow())

    async def forget_recording(self, call_id: str, name: str) -> None:
        """The recording file called `name` is gone (retention): take it off the call."""
        def without(paths: list[str]) -> list[str]:
            return [path for path in paths if PurePath(path).name != name]

        await self.database.transaction(_change_recordings, call_id, without, utcnow())

    async def claim_media_token(self, call_id: str, token: str) -> bool:
        """Whether `token` opens this call's media socket now; a token is good for one socket."""
        return await self.database.transaction(_claim_media_token, call_id, token)

    async def claim_agent(self, call_id: str) -> bool:
        """Whether this caller is the one to create the Ultravox call for an answered outbound call."""
        return await self.database.transaction(_claim_agent, call_id, utcnow())

    async def lapsed_creating(self, *, now: dt.datetime, stale_after: dt.timedelta,
                              limit: int = 100) -> builtins.list[CallRecord]:
        """Inbound records still `creating` past their owner's lease (its process died, or lost
        the store while creating): to be settled by `settle_creating`."""
        return await self.database.transaction(_lapsed_creating, now, stale_after, limit)

    async def settle_creating(self, record: CallRecord, *, ultravox_call_id: str | None = None,
                              join_url: str | None = None, stream_expires: int | None = None,
                              failure_reason: str | None = None, retake_for: str | None = None,
                              lease: dt.timedelta | None = None) -> Claim:
        """Settle a lapsed `creating` record, if nobody did meanwhile (a compare-and-set on its
        attempt): adopt the Ultravox call found for it (`ultravox_call_id`, `join_url`; bridged,
        `stream_expires`: its one media token from now on), fail it
        (`failure_reason`), or hand it to `retake_for` (a process: no Ultravox call was made) for
        `lease`. Returns the record as it is now, owned when this caller retook it."""
        return await self._observed(_settle_creating, record, ultravox_call_id, join_url, stream_expires,
                                    failure_reason[:MAX_REASON] if failure_reason else None, retake_for, lease, utcnow())

    async def fail_abandoned(self, stage: str, *, before: dt.datetime, reason: str,
                             call_id: str | None = None) -> list[CallRecord]:
        """Calls left half-made at `stage` (see ABANDONED) since before `before` by a process that
        died (only `call_id`, if given): failed now, with `reason`. Returns them as they were."""
        condition = ABANDONED[stage]
        if call_id is not None:
            stage_condition = condition
            condition = lambda cutoff: sa.and_(stage_condition(cutoff), calls.c.id == call_id)  # noqa: E731
        return await self._observed(_fail_abandoned, condition, before, reason[:MAX_REASON], utcnow())

    async def abandoned(self, stage: str, *, before: dt.datetime, limit: int = 100) -> builtins.list[CallRecord]:
        """Calls left half-made at `stage` since before `before`, as they are (nothing changed)."""
        return await self.database.transaction(
            lambda connection: [_record(row) for row in connection.execute(
                sa.select(calls).where(ABANDONED[stage](before)).order_by(calls.c.created_at).limit(limit))])

    async def known_carrier_calls(self, carrier: str, carrier_call_ids: builtins.list[str]) -> set[str]:
        """Which of the carrier's call ids some record has."""
        if not carrier_call_ids:
            return set()
        return await self.database.transaction(lambda connection: set(connection.execute(
            sa.select(calls.c.carrier_call_id).where(calls.c.carrier == carrier,
                                                     calls.c.carrier_call_id.in_(carrier_call_ids))).scalars()))

    async def unnamed_calls(self, carrier: str, from_number: str, to_number: str, *, excluding: str,
                            abandoned_before: dt.datetime) -> builtins.list[CallRecord]:
        """Outbound calls on `carrier` from `from_number` to `to_number` (but `excluding`), not over,
        whose carrier call id is not known yet: a call the carrier lists between those numbers may
        be theirs. Those a dead process left unplaced before `abandoned_before` are not counted:
        they are settled in turn, oldest first, by the same sweep."""
        left_by_the_dead = ABANDONED["unplaced"](abandoned_before)
        return await self.database.transaction(lambda connection: [_record(row) for row in connection.execute(
            sa.select(calls).where(
                calls.c.status.in_(LIVE_STATUSES), calls.c.direction == "outbound", calls.c.carrier == carrier,
                calls.c.from_number == from_number, calls.c.to_number == to_number,
                calls.c.carrier_call_id.is_(None), calls.c.id != excluding, sa.not_(left_by_the_dead),
            ).order_by(calls.c.created_at).limit(100))])

    async def find_by_ultravox_call_id(self, ultravox_call_id: str) -> CallRecord | None:
        return await self.database.transaction(_find_by, calls.c.ultravox_call_id == ultravox_call_id)

    async def find_by_carrier_call(self, carrier: str, carrier_call_id: str) -> CallRecord | None:
        return await self.database.transaction(
            _find_by, sa.and_(calls.c.carrier == carrier, calls.c.carrier_call_id == carrier_call_id)
        )

    async def list(self, *, filters: "CallFilters", limit: int, cursor: tuple[dt.datetime, str] | None):
        """Newest first; the cursor is the (created_at, id) of the last record of the previous page."""
        return await self.database.transaction(_list, filters, limit, cursor)

    async def live_calls(self, since: dt.datetime) -> builtins.list[tuple[str, str | None, int]]:
        """(carrier, route, count) of calls not final yet, created since `since` (for /metrics, at
        every scrape: an index range per live status, never a scan of the table)."""
        return await self.database.transaction(_live_calls, since)

    async def list_all(self) -> builtins.list[CallRecord]:
        return await self.database.transaction(_list_all)

    # --- group commit ---------------------------------------------------------------------------------
    async def _apply(self, batch: builtins.list["_Write"]) -> builtins.list[Claim | None]:
        # Callers wait on these (the inbound path): ahead of queued background work.
        return await self._observed(_apply_batch, batch, urgent=True)


@dataclass(frozen=True)
class StoredAnswer:
    status_code: int
    media_type: str | None
    body: str


@dataclass(frozen=True)
class Remembered:
    first: bool  # the first delivery with its key
    answer: StoredAnswer | None = None  # else: the first one's answer, once it was sent


@dataclass(frozen=True)
class OutboundInsert:
    record: CallRecord | None
    created: bool  # False: an earlier request with the same idempotency key made `record`
    rate_limited: bool = False


@dataclass(frozen=True)
class Updated:
    record: CallRecord | None  # None: no such call
    advanced: bool  # the status moved forward with this update (only one racing update gets True)

    @property
    def existing(self) -> CallRecord:
        """`record`, of a call known to be recorded (calls are never deleted)."""
        if self.record is None:
            raise LookupError("the updated call is not in the store")
        return self.record


@dataclass(frozen=True)
class CallScope:
    """The calls an API key may see and act on (gateway.access): the one predicate every read of a
    call through /v1 goes through. Empty routes / carriers: any."""

    routes: tuple[str, ...] = ()
    carriers: tuple[str, ...] = ()
    # Own calls only: the calls placed with this key id, and those of the campaigns it created.
    api_key_id: str | None = None

    def clause(self) -> sa.ColumnElement[bool]:
        conditions: list[sa.ColumnElement[bool]] = []
        if self.routes:
            conditions.append(calls.c.route.in_(self.routes))
        if self.carriers:
            conditions.append(calls.c.carrier.in_(self.carriers))
        if self.api_key_id is not None:
            owned_campaigns = sa.select(campaigns.c.id).where(campaigns.c.api_key_id == self.api_key_id)
            campaign_id = sa.func.substr(calls.c.idempotency_key, len(CAMPAIGN_KEY_PREFIX) + 1, 36)
            conditions.append(sa.or_(
                calls.c.api_key_id == self.api_key_id,
                sa.and_(calls.c.api_key_id == CAMPAIGN_KEY_ID, campaign_id.in_(owned_campaigns)),
            ))
        return sa.and_(sa.true(), *conditions)


@dataclass(frozen=True)
class CallFilters:
    scope: CallScope | None = None  # None: every call
    status: str | None = None
    carrier: str | None = None
    direction: str | None = None
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None


# --- the SQL, run by Database.transaction on a sync Connection ---------------------------------------


def insert_for(connection: sa.Connection):
    return postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert


def _create_outbound(connection: sa.Connection, values: dict, max_recent: int | None, since: dt.datetime,
                     observer: ChangeObserver | None) -> OutboundInsert:
    key = values.get("idempotency_key")
    by_key = sa.select(calls).where(calls.c.api_key_id == values["api_key_id"], calls.c.idempotency_key == key)
    if key:
        existing = connection.execute(by_key).first()
        if existing:
            return OutboundInsert(_record(existing), created=False)
    if max_recent is not None:  # None: paced by its caller (a campaign)
        if connection.dialect.name == "postgresql":
            # Count-then-insert is only a limit if requests of one key take turns (several replicas).
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": values["api_key_id"]})
        recent = connection.execute(
            sa.select(sa.func.count()).select_from(calls)
            .where(calls.c.api_key_id == values["api_key_id"], calls.c.created_at >= since)
        ).scalar_one()
        if recent >= max_recent:
            return OutboundInsert(None, created=False, rate_limited=True)
    # Two racing requests with one key: the unique index lets one in, the other reads it back.
    inserted = connection.execute(
        insert_for(connection)(calls).values(**values)
        .on_conflict_do_nothing(index_elements=["api_key_id", "idempotency_key"]).returning(calls.c.id)
    ).first()
    if inserted is None:
        return OutboundInsert(_record(connection.execute(by_key).one()), created=False)
    record = _get(connection, values["id"])
    _observe(connection, observer, [(None, record)])
    return OutboundInsert(record, created=True)


def _observe(connection: sa.Connection, observer: ChangeObserver | None,
             changes: list[tuple[CallRecord | None, CallRecord | None]]) -> None:
    if observer is None:
        return
    effects = [effect for before, after in changes if after is not None for effect in observer.call_changed(before, after)]
    if effects:
        observer.write(connection, effects)


def _update(
    connection: sa.Connection, call_id: str, status: str | None, rank: int | None, fill: dict, replace: dict,
    now: dt.datetime, observer: ChangeObserver | None,
):
    # Read under the row's lock: what the change changed, for the observer.
    before = _get(connection, call_id, lock=True) if observer is not None else None
    advanced = False
    if fill or replace:
        # A late or repeated event must not overwrite what an earlier one established.
        filled = {name: sa.func.coalesce(calls.c[name], value) for name, value in fill.items()}
        connection.execute(
            sa.update(calls).where(calls.c.id == call_id).values(updated_at=now, **filled, **replace)
        )
    if status:
        assert rank is not None  # given with every status (CallStore.update)
        values: dict[str, Any] = {"status": status, "status_rank": rank, "updated_at": now}
        if status in FINAL_STATUSES:
            values["ended_at"] = sa.func.coalesce(calls.c.ended_at, now)
        elif rank >= STATUS_RANK[ANSWERED]:
            values["answered_at"] = sa.func.coalesce(calls.c.answered_at, now)
        advanced = connection.execute(
            sa.update(calls).where(calls.c.id == call_id, calls.c.status_rank < rank).values(**values)
        ).rowcount == 1
    after = _get(connection, call_id)
    if before is not None:
        _observe(connection, observer, [(before, after)])
    return Updated(after, advanced)


# Where a dying process can leave a call, and since when it has been there (for `before`).
ABANDONED = {
    # Inbound: claimed, the Ultravox call being created.
    "creating": lambda before: sa.and_(calls.c.direction == "inbound", calls.c.status == CREATING,
                                       calls.c.updated_at < before),
    # Outbound: accepted by the API, the dial not (known to be) placed.
    "unplaced": lambda before: sa.and_(calls.c.direction == "outbound", calls.c.status == QUEUED,
                                       calls.c.placed_at.is_(None), calls.c.created_at < before),
    # Outbound: answered, its agent claimed, no join URL recorded.
    "unjoined": lambda before: sa.and_(calls.c.direction == "outbound", calls.c.status == ANSWERED,
                                       calls.c.join_url.is_(None), calls.c.agent_claimed_at < before),
}


def _fail_abandoned(connection: sa.Connection, condition, before: dt.datetime, reason: str,
                    now: dt.datetime, observer: ChangeObserver | None) -> list[CallRecord]:
    # Row by row with a compare-and-set on the status, so a call that moved on meanwhile is left alone.
    stuck = [_record(row) for row in connection.execute(sa.select(calls).where(condition(before)).limit(500))]
    failed = []
    for record in stuck:
        changed = connection.execute(
            sa.update(calls).where(calls.c.id == record.id, calls.c.status == record.status).values(
                status=FAILED, status_rank=STATUS_RANK[FAILED], failure_reason=reason, updated_at=now,
                ended_at=sa.func.coalesce(calls.c.ended_at, now))
        ).rowcount
        if changed:
            failed.append(record)
    _observe(connection, observer, [(record, _get(connection, record.id)) for record in failed] if observer else [])
    return failed


def _record_media(connection: sa.Connection, call_id: str, stats: str, now: dt.datetime) -> None:
    connection.execute(sa.update(calls).where(calls.c.id == call_id).values(media_stats=stats, updated_at=now))


def _change_recordings(connection: sa.Connection, call_id: str, change, now: dt.datetime) -> None:
    # Read and written in one transaction, the row locked (PostgreSQL; SQLite has one writer at a
    # time): replicas adding and removing entries at once must not undo each other.
    stored = connection.execute(
        sa.select(calls.c.recording_path).where(calls.c.id == call_id).with_for_update()
    ).scalar_one_or_none()
    before = _paths(stored)
    after = change(before)
    if after != before:
        connection.execute(
            sa.update(calls).where(calls.c.id == call_id).values(recording_path=",".join(after) or None, updated_at=now)
        )


def _claim_media_token(connection: sa.Connection, call_id: str, token: str) -> bool:
    used = sa.or_(calls.c.media_token.is_(None), calls.c.media_token != token)
    return connection.execute(
        sa.update(calls).where(calls.c.id == call_id, used).values(media_token=token)
    ).rowcount == 1


def _claim_agent(connection: sa.Connection, call_id: str, now: dt.datetime) -> bool:
    return connection.execute(
        sa.update(calls).where(calls.c.id == call_id, calls.c.agent_claimed_at.is_(None)).values(agent_claimed_at=now)
    ).rowcount == 1


def _find_by(connection: sa.Connection, condition) -> CallRecord | None:
    row = connection.execute(sa.select(calls).where(condition)).first()
    return _record(row) if row else None


def _list(connection: sa.Connection, filters: CallFilters, limit: int, cursor):
    query = sa.select(calls)
    if filters.scope is not None:
        query = query.where(filters.scope.clause())
    for column, value in (("status", filters.status), ("carrier", filters.carrier), ("direction", filters.direction)):
        if value is not None:
            query = query.where(calls.c[column] == value)
    if filters.created_after is not None:
        query = query.where(calls.c.created_at >= filters.created_after)
    if filters.created_before is not None:
        query = query.where(calls.c.created_at < filters.created_before)
    if cursor is not None:
        created_at, call_id = cursor
        query = query.where(sa.or_(
            calls.c.created_at < created_at, sa.and_(calls.c.created_at == created_at, calls.c.id < call_id)
        ))
    rows = connection.execute(query.order_by(calls.c.created_at.desc(), calls.c.id.desc()).limit(limit + 1)).all()
    records = [_record(row) for row in rows[:limit]]
    return records, len(rows) > limit


LIVE_STATUSES = [status for status in STATUS_RANK if status not in FINAL_STATUSES]


def live_calls_query(since: dt.datetime) -> sa.Select:
    return (
        sa.select(calls.c.carrier, calls.c.route, sa.func.count())
        .where(calls.c.status.in_(LIVE_STATUSES), calls.c.created_at >= since)
        .group_by(calls.c.carrier, calls.c.route)
    )


def _live_calls(connection: sa.Connection, since: dt.datetime) -> list[tuple[str, str | None, int]]:
    return [(carrier, route, count) for carrier, route, count in connection.execute(live_calls_query(since))]


def _get(connection: sa.Connection, call_id: str, *, lock: bool = False) -> CallRecord | None:
    query = sa.select(calls).where(calls.c.id == call_id)
    row = connection.execute(query.with_for_update() if lock else query).first()
    return _record(row) if row else None


def _get_within(connection: sa.Connection, call_id: str, scope: CallScope | None) -> CallRecord | None:
    query = sa.select(calls).where(calls.c.id == call_id)
    if scope is not None:
        query = query.where(scope.clause())
    row = connection.execute(query).first()
    return _record(row) if row else None


# Built once: constructing the IN clause costs about as much as running the query on SQLite.
_GET_MANY_LOCKED = (sa.select(calls).where(calls.c.id.in_(sa.bindparam("ids", expanding=True)))
                    .order_by(calls.c.id).with_for_update())  # locks taken in one order (by id)


def _list_all(connection: sa.Connection) -> list[CallRecord]:
    return [_record(row) for row in connection.execute(sa.select(calls).order_by(calls.c.created_at))]


def _apply_batch(connection: sa.Connection, batch: list["_Write"], observer: ChangeObserver | None) -> list[Claim | None]:
    """One transaction for a batch: outcomes first (a retry in the same batch then sees them)."""
    outcomes = [write.values for write in batch if write.kind == "outcome"]
    claims = [write for write in batch if write.kind == "claim"]
    seen = _remember_all(connection, [write for write in batch if write.kind == "seen"])
    answers = [write.values for write in batch if write.kind == "answer"]
    if answers:
        connection.execute(_REMEMBER_ANSWER, answers)
    if outcomes:
        if observer is not None:
            # Read under the rows' locks; what the update makes of them follows from it (no second read).
            rows = connection.execute(_GET_MANY_LOCKED, {"ids": [outcome["call_id"] for outcome in outcomes]}).all()
            before = {row.id: _record(row) for row in rows}
            after, ranks = dict(before), {row.id: row.status_rank for row in rows}
            for outcome in outcomes:
                call_id = outcome["call_id"]
                if call_id in after and ranks[call_id] < outcome["new_rank"]:
                    after[call_id], ranks[call_id] = _with_outcome(after[call_id], outcome), outcome["new_rank"]
        connection.execute(_SET_OUTCOME, outcomes)
        if observer is not None:
            _observe(connection, observer, [(before[i], after[i]) for i in before if after[i] is not before[i]])
    results: dict[int, Any] = _claim_all(connection, claims, observer) if claims else {}
    results.update(seen)
    return [results.get(id(write)) for write in batch]


def _remember_all(connection: sa.Connection, writes: list["_Write"]) -> dict[int, "Remembered"]:
    """Each write's key inserted unless known: first for the first write of a key not known before;
    the others get the first delivery's answer, if it has been recorded."""
    if not writes:
        return {}
    unique = {(write.values["carrier"], write.values["key"]): write for write in reversed(writes)}
    statement = (insert_for(connection)(webhook_replays).on_conflict_do_nothing(index_elements=["carrier", "key"])
                 .returning(webhook_replays.c.carrier, webhook_replays.c.key))
    inserted = {(row.carrier, row.key) for row in connection.execute(statement, [w.values for w in unique.values()])}
    known = [pair for pair in unique if pair not in inserted]
    answers: dict[tuple[str, str], StoredAnswer] = {}
    if known:
        rows = connection.execute(sa.select(webhook_replays).where(
            sa.tuple_(webhook_replays.c.carrier, webhook_replays.c.key).in_(known), webhook_replays.c.answer.is_not(None)))
        answers = {(row.carrier, row.key): StoredAnswer(row.status_code, row.media_type, row.answer) for row in rows}
    results = {}
    for write in writes:
        pair = (write.values["carrier"], write.values["key"])
        first = unique[pair] is write and pair in inserted
        results[id(write)] = Remembered(first, None if first else answers.get(pair))
    return results


# One statement for every answer in a batch (executemany); the first answer recorded stays.
_REMEMBER_ANSWER = (
    sa.update(webhook_replays)
    .where(webhook_replays.c.carrier == sa.bindparam("answer_carrier"), webhook_replays.c.key == sa.bindparam("answer_key"),
           webhook_replays.c.answer.is_(None))
    .values(status_code=sa.bindparam("new_status_code"), media_type=sa.bindparam("new_media_type"),
            answer=sa.bindparam("new_answer"))
)


def _forget_deliveries(connection: sa.Connection, before: dt.datetime, limit: int) -> int:
    # In slices, oldest first, so one prune never holds a long transaction.
    keys = sa.select(webhook_replays.c.carrier, webhook_replays.c.key).where(
        webhook_replays.c.expires_at < before).order_by(webhook_replays.c.expires_at).limit(limit)
    rows = connection.execute(keys).all()
    if not rows:
        return 0
    return connection.execute(sa.delete(webhook_replays).where(
        sa.tuple_(webhook_replays.c.carrier, webhook_replays.c.key).in_([tuple(row) for row in rows]))).rowcount


def _lease_lapsed(now: dt.datetime, stale_after: dt.timedelta):
    # Records from before leases (migration 12) count from their last change.
    return sa.or_(calls.c.lease_until < now, sa.and_(calls.c.lease_until.is_(None), calls.c.updated_at < now - stale_after))


def _lapsed_creating(connection: sa.Connection, now: dt.datetime, stale_after: dt.timedelta,
                     limit: int) -> list[CallRecord]:
    query = sa.select(calls).where(calls.c.status == CREATING, calls.c.direction == "inbound",
                                   _lease_lapsed(now, stale_after)).order_by(calls.c.updated_at).limit(limit)
    return [_record(row) for row in connection.execute(query)]


def _settle_creating(connection: sa.Connection, record: CallRecord, ultravox_call_id: str | None,
                     join_url: str | None, stream_expires: int | None, failure_reason: str | None,
                     retake_for: str | None, lease: dt.timedelta | None, now: dt.datetime,
                     observer: ChangeObserver | None) -> Claim:
    values: dict[str, Any] = {"updated_at": now, "lease_until": None}
    if retake_for is not None:
        assert lease is not None
        values.update(attempts=calls.c.attempts + 1, lease_owner=retake_for, lease_until=now + lease)
    elif join_url is not None:
        values.update(status=IN_PROGRESS, status_rank=STATUS_RANK[IN_PROGRESS], ultravox_call_id=ultravox_call_id,
                      join_url=join_url, stream_expires=stream_expires)
    else:
        values.update(status=FAILED, status_rank=STATUS_RANK[FAILED], failure_reason=failure_reason,
                      ultravox_call_id=ultravox_call_id, ended_at=sa.func.coalesce(calls.c.ended_at, now))
    # Only if it is still the attempt that lapsed: another replica may have settled it meanwhile.
    taken = connection.execute(sa.update(calls).where(
        calls.c.id == record.id, calls.c.status == CREATING, calls.c.attempts == record.attempts).values(**values)
    ).rowcount == 1
    after = _get(connection, record.id)
    assert after is not None  # calls are never deleted
    if taken:
        _observe(connection, observer, [(record, after)])
    return Claim(after, owned=taken and retake_for is not None)


def _claim_all(connection: sa.Connection, claims: list["_Write"], observer: ChangeObserver | None) -> dict[int, Claim]:
    statement = (
        insert_for(connection)(calls).on_conflict_do_nothing(index_elements=["carrier", "carrier_call_id"]).returning(calls.c.id)
    )
    inserted = {row.id for row in connection.execute(statement, [write.values for write in claims])}
    results = {}
    for write in claims:
        if write.values["id"] in inserted:
            values = {k: v for k, v in write.values.items() if k != "status_rank"}
            record = CallRecord(join_url=None, ultravox_call_id=None, **values)
            results[id(write)] = Claim(record, owned=True)
            _observe(connection, observer, [(None, record)])
        else:
            results[id(write)] = _claim_existing(connection, write, observer)
    return results


def _claim_existing(connection: sa.Connection, write: "_Write", observer: ChangeObserver | None) -> Claim:
    """The carrier call is known already: a retry, or a race with another delivery."""
    values = write.values
    row = connection.execute(
        sa.select(calls).where(calls.c.carrier == values["carrier"], calls.c.carrier_call_id == values["carrier_call_id"])
    ).one()
    existing = _record(row)
    now = values["updated_at"]
    # A record left `creating` is never retaken here, even past its lease: its Ultravox call may
    # exist (the owner died after creating it). The caller settles it first (settle_creating).
    retryable = existing.status == FAILED
    if values["status"] != CREATING or not retryable:
        return Claim(existing, owned=False)
    # Compare-and-set on the attempt count: of two racing retries only one takes it over.
    taken = connection.execute(
        sa.update(calls)
        .where(calls.c.id == existing.id, calls.c.attempts == existing.attempts)
        .values(status=CREATING, status_rank=STATUS_RANK[CREATING], failure_reason=None,
                attempts=calls.c.attempts + 1, updated_at=now, lease_owner=values["lease_owner"],
                lease_until=values["lease_until"])
    )
    # Whoever won, hand back the record as it is now, not the stale one.
    now_record = _get(connection, existing.id)
    assert now_record is not None  # read in this transaction a moment ago
    if taken.rowcount == 1:
        _observe(connection, observer, [(existing, now_record)])
    return Claim(now_record, owned=taken.rowcount == 1)


def _with_outcome(record: CallRecord, outcome: dict[str, Any]) -> CallRecord:
    """`record` as _SET_OUTCOME leaves it when its rank is below the outcome's (the same rules, in
    Python, for the observer)."""
    kept = {name: outcome[f"new_{name}"] if outcome[f"new_{name}"] is not None else getattr(record, name)
            for name in ("ultravox_call_id", "join_url", "failure_reason", "stream_expires")}
    return dataclasses.replace(record, status=outcome["new_status"], lease_until=None, updated_at=outcome["now"], **kept)


# One statement for every outcome in a batch (executemany); NULL keeps what is stored.
_SET_OUTCOME = (
    sa.update(calls)
    .where(calls.c.id == sa.bindparam("call_id"), calls.c.status_rank < sa.bindparam("new_rank"))
    .values(
        status=sa.bindparam("new_status"),
        status_rank=sa.bindparam("new_rank"),
        ultravox_call_id=sa.func.coalesce(sa.bindparam("new_ultravox_call_id", type_=sa.String), calls.c.ultravox_call_id),
        join_url=sa.func.coalesce(sa.bindparam("new_join_url", type_=sa.Text), calls.c.join_url),
        failure_reason=sa.func.coalesce(sa.bindparam("new_failure_reason", type_=sa.Text), calls.c.failure_reason),
        stream_expires=sa.func.coalesce(sa.bindparam("new_stream_expires", type_=sa.BigInteger), calls.c.stream_expires),
        # A finished record has no lease: nothing is left for another replica to settle.
        lease_until=None,
        updated_at=sa.bindparam("now"),
    )
)


@dataclass
class _Write:
    kind: str  # "claim", "outcome" or "seen" (a signed webhook's one-time part)
    values: dict
    stale_after: dt.timedelta | None = None
    # Made on the event loop when the write is submitted (the writer's `submit`).
    future: asyncio.Future = field(init=False)
    abandoned: bool = False  # its caller stopped waiting: a claim not yet written is dropped


class StoreStalled(Exception):
    """The store did not write in time (a stalled database): the caller goes on without it."""


# How long a write on the inbound path waits for the store: a caller is connected unrecorded past it.
WRITE_DEADLINE_SECONDS = 1.0


class _GroupCommit:
    """Writes queue up while a transaction runs and go together in the next one.

    Under load this turns a transaction (and its round trips to the database thread or server)
    per write into one per batch; alone, a write goes at once, with no added wait.
    """

    MAX_BATCH = 256

    def __init__(self, apply, deadline: float = WRITE_DEADLINE_SECONDS, clock=time.monotonic):
        self._apply = apply
        self._deadline = deadline
        self._clock = clock
        # Bound to the running loop on first use, not here (asyncio.Queue since Python 3.10).
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._busy_since: float | None = None  # when the running transaction began

    def stalled_for(self) -> float:
        """Seconds the running transaction has taken, once past the deadline; else 0."""
        busy = self._clock() - self._busy_since if self._busy_since is not None else 0.0
        return busy if busy > self._deadline else 0.0

    async def submit(self, write: _Write):
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="call-store-writer")
        write.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(write)
        try:
            # Shielded: an outcome still gets written once the store answers again.
            return await asyncio.wait_for(asyncio.shield(write.future), self._deadline)
        except TimeoutError:
            write.abandoned = True
            raise StoreStalled(f"the store did not write within {self._deadline:g} s") from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            while not self._queue.empty():
                write = self._queue.get_nowait()
                if not write.future.done():
                    write.future.set_exception(RuntimeError("the call store is closed"))

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < self.MAX_BATCH:
                batch.append(self._queue.get_nowait())
            batch = self._pending(batch)
            if not batch:
                continue
            self._busy_since = self._clock()
            try:
                self._settle(batch, await self._apply(batch))
            except Exception as error:
                if _unavailable(error):  # the store, not one write: retrying each would wait again
                    for write in batch:
                        _fail(write, error)
                    continue
                # One bad write must not fail its neighbours: apply them one by one.
                for write in batch:
                    try:
                        self._settle([write], await self._apply([write]))
                    except Exception as error:
                        _fail(write, error)
            finally:
                self._busy_since = None

    @staticmethod
    def _pending(batch: list[_Write]) -> list[_Write]:
        """The writes still to make: a claim whose caller gave up (it connected the caller
        unrecorded) would only leave a record of a call made without it."""
        for write in batch:
            if write.abandoned and write.kind == "claim":
                write.future.cancel()
        return [write for write in batch if not write.future.done()]

    @staticmethod
    def _settle(batch: list[_Write], results: list) -> None:
        for write, result in zip(batch, results):
            if not write.future.done():  # its caller may have given up (cancelled)
                write.future.set_result(result)


def _fail(write: _Write, error: Exception) -> None:
    if not write.future.done():
        write.future.set_exception(error)
        if write.abandoned:  # nobody awaits it any more: retrieved here, or asyncio would warn
            write.future.exception()


def _unavailable(error: Exception) -> bool:
    """Whether `error` says the database could not be reached in time (not that a write was wrong)."""
    if isinstance(error, (TimeoutError, OSError, StoreStalled)):
        return True
    return isinstance(error, sa.exc.DBAPIError) and (
        error.connection_invalidated or isinstance(error.orig, (TimeoutError, OSError))
        or isinstance(error, sa.exc.OperationalError))


def _migrate(connection: sa.Connection) -> int:
    if connection.dialect.name == "postgresql":
        # Replicas starting together must not both run the same migration.
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    schema_version.create(connection, checkfirst=True)
    applied = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    for version, migration in enumerate(MIGRATIONS, start=1):
        if version > applied:
            migration(connection)
            connection.execute(schema_version.insert().values(version=version, applied_at=utcnow()))
    return len(MIGRATIONS)
